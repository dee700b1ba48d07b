"""ONNX Runtime passes on an exported model (form ONNX -> ONNX).

`ort-optimize`: transformer fusions (attention, skip-layer-norm, GELU, ...; see fusions.py for the two
fusers and `fusions=auto|onnxscript|ort|none`), then ORT's own graph optimizations at `level`, with
the session options (threads, execution mode) as config. A fuser that fails is a note in info, and
the session-level optimization still applies.

`ort-quantize` lives in ort_quantize.py.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Literal

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.pass_protocol import ONNX, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, all_of, need_packages
from .onnx import _first_lines, check_against, example_inputs


def _need_ort_model(model: Any, who: str) -> Any:
    from .session import OrtModel

    if not isinstance(model, OrtModel):
        raise PassApplyError(f"{who}: expected an ONNX model from onnx-export, got {type(model).__name__}")
    return model


@dataclasses.dataclass(frozen=True)
class OrtOptimizeConfig(PassConfig):
    level: Literal["basic", "extended", "all"] = "all"
    fusions: Literal["auto", "onnxscript", "ort", "none"] = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    atol: float = 1e-4

    def __post_init__(self) -> None:
        for option in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, option)
            check(value >= 0, f"ort-optimize: option '{option}' must be >= 0 (0 = ONNX Runtime's default), got {value}")
        check(self.atol > 0, f"ort-optimize: option 'atol' must be > 0, got {self.atol}")


class OrtOptimizePass(ConfiguredPass):
    """Transformer fusions (attention, skip-layer-norm, GELU, ...) + ORT graph optimization level and
    session options; the output is checked against the input model."""

    name = "ort-optimize"
    Config = OrtOptimizeConfig
    takes = frozenset({ONNX})
    gives = ONNX

    def requirements(self) -> Availability:
        from .session import one_onnxruntime

        return all_of(need_packages("onnx", "onnxruntime", extra="onnx"), one_onnxruntime())

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        from .fusions import fuse_transformer

        src = _need_ort_model(model, self.name)
        cfg = self.config
        tmp = tempfile.TemporaryDirectory(prefix="optistack-ort-opt-")
        out_path = os.path.join(tmp.name, "model.onnx")
        info: dict[str, Any] = {"level": cfg.level}
        fused = False
        if cfg.fusions != "none":
            fused, facts = fuse_transformer(src.path, out_path, cfg.fusions, src.meta)
            info.update(facts)
        path = out_path if fused else src.path
        keep = tmp if fused else (tmp, src.keepalive)  # a reused input file must outlive this model
        new = _session(self.name, tmp, path, keep, src, intra_op_threads=cfg.intra_op_threads or src.intra_op_threads,
                       inter_op_threads=cfg.inter_op_threads, execution_mode=cfg.execution_mode,
                       graph_optimization=cfg.level)
        args, kwargs = example_inputs(ctx, self.name)
        info.update(check_against(self.name, src(*args, **kwargs), new(*args, **kwargs), cfg.atol))
        info.update({"file_bytes": new.model_bytes(), "provider": new.provider,
                     "threads": f"intra={new.intra_op_threads or 'default'},inter={new.inter_op_threads or 'default'}"})
        return PassResult(new, modified=True, info=info)


def _session(who: str, tmp: Any, path: str, keep: Any, src: Any, **options: Any) -> Any:
    """An OrtModel for `path` with `src`'s provider and facts; a clear PassApplyError if ORT refuses it."""
    from .session import OrtModel

    try:
        return OrtModel(path, keepalive=keep, provider=src.requested_provider, meta=src.meta, **options)
    except Exception as exc:
        tmp.cleanup()
        raise PassApplyError(f"{who}: ONNX Runtime could not load the result: "
                             f"{type(exc).__name__}: {_first_lines(str(exc))}") from exc
