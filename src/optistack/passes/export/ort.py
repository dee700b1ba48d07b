"""ONNX Runtime passes on an exported model (form ONNX -> ONNX).

`ort-optimize`: transformer fusions from `onnxruntime.transformers.optimizer` (attention, layer norm,
GELU, ... for BERT-like graphs) when `fusions=true`, then ORT's own graph optimizations at `level`.
If the fusion tool fails, the pass falls back to session-level optimization alone and says so in info.

`ort-quantize`: `onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantized per
call). Lossy: the accuracy gate decides whether to keep it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Any, Literal

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.pass_protocol import ONNX, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, need_packages
from .onnx import _first_lines, check_against, example_inputs

_OPT_LEVEL = {"basic": 1, "extended": 2, "all": 99}


def _need_ort_model(model: Any, who: str) -> Any:
    from .session import OrtModel

    if not isinstance(model, OrtModel):
        raise PassApplyError(f"{who}: expected an ONNX model from onnx-export, got {type(model).__name__}")
    return model


@dataclasses.dataclass(frozen=True)
class OrtOptimizeConfig(PassConfig):
    level: Literal["basic", "extended", "all"] = "all"
    fusions: bool = True
    intra_op_threads: int = 0
    atol: float = 1e-4

    def __post_init__(self) -> None:
        check(self.intra_op_threads >= 0, f"ort-optimize: option 'intra_op_threads' must be >= 0, got {self.intra_op_threads}")
        check(self.atol > 0, f"ort-optimize: option 'atol' must be > 0, got {self.atol}")


class OrtOptimizePass(ConfiguredPass):
    """Transformer fusions (BERT) + ORT graph optimization level; output checked against the input model."""

    name = "ort-optimize"
    Config = OrtOptimizeConfig
    takes = frozenset({ONNX})
    gives = ONNX

    def requirements(self) -> Availability:
        return need_packages("onnx", "onnxruntime", extra="onnx")

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        from .session import OrtModel

        src = _need_ort_model(model, self.name)
        cfg = self.config
        tmp = tempfile.TemporaryDirectory(prefix="optistack-ort-opt-")
        out_path = os.path.join(tmp.name, "model.onnx")
        info: dict[str, Any] = {"level": cfg.level}
        fused = False
        if cfg.fusions:
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                # opt_level=0: only the Python fusions here; ORT's own optimizations run in the session
                opt = optimize_model(src.path, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
                stats = opt.get_fused_operator_statistics() or {}
                for op, count in sorted(stats.items()):
                    if count:
                        info[f"fused_{op}"] = int(count)
                opt.save_model_to_file(out_path, use_external_data_format=os.path.getsize(src.path) > 1_500_000_000)
                fused = True
            except Exception as exc:
                info["fusions_fallback"] = f"transformer fusions failed, session optimization only: {type(exc).__name__}: {_first_lines(str(exc), 2, 300)}"
        info["fusions"] = fused
        path = out_path if fused else src.path
        # Keep the input model's dir alive too when its file is reused.
        keep = (tmp, src.keepalive) if not fused else tmp
        try:
            new = OrtModel(path, intra_op_threads=cfg.intra_op_threads or src.intra_op_threads,
                           graph_optimization=cfg.level, keepalive=keep)
        except Exception as exc:
            tmp.cleanup()
            raise PassApplyError(f"ort-optimize: ONNX Runtime could not load the optimized model: {type(exc).__name__}: {_first_lines(str(exc))}") from exc
        args, kwargs = example_inputs(ctx, self.name)
        info.update(check_against(self.name, src(*args, **kwargs), new(*args, **kwargs), cfg.atol))
        info.update({"file_bytes": new.model_bytes(), "provider": new.provider})
        return PassResult(new, modified=True, info=info)


@dataclasses.dataclass(frozen=True)
class OrtQuantizeConfig(PassConfig):
    per_channel: bool = True
    reduce_range: bool = False
    op_types: str = "MatMul"
    exclude: str = ""

    def __post_init__(self) -> None:
        ops = [o for o in self.op_types.split("|") if o]
        check(bool(ops) and all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", o) for o in ops),
              f"ort-quantize: option 'op_types' must be ONNX op names joined by '|' (e.g. MatMul|Gemm), got {self.op_types!r}")
        try:
            re.compile(self.exclude)
        except re.error as exc:
            raise_config(f"ort-quantize: option 'exclude' must be a regular expression, got {self.exclude!r}: {exc}")


def raise_config(message: str) -> None:
    check(False, message)


class OrtQuantizePass(ConfiguredPass):
    """`quantize_dynamic`: int8 weights for the chosen op types, nodes matching `exclude` left in fp32."""

    name = "ort-quantize"
    Config = OrtQuantizeConfig
    takes = frozenset({ONNX})
    gives = ONNX
    lossy = True

    def requirements(self) -> Availability:
        return need_packages("onnx", "onnxruntime", extra="onnx")

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from .session import OrtModel

        src = _need_ort_model(model, self.name)
        cfg = self.config
        op_types = [o for o in cfg.op_types.split("|") if o]
        tmp = tempfile.TemporaryDirectory(prefix="optistack-ort-q-")
        out_path = os.path.join(tmp.name, "model.onnx")
        in_path = src.path
        proto = onnx.load(src.path, load_external_data=False)
        graph = proto.graph
        if any(not n.name for n in graph.node):
            # `exclude` matches node names, so every node needs one: name the unnamed ones in a copy.
            proto = onnx.load(src.path)
            graph = proto.graph
            taken = {n.name for n in graph.node}
            for i, n in enumerate(graph.node):
                if not n.name:
                    name = f"{n.op_type}_{i}"
                    while name in taken:
                        name += "_"
                    n.name = name
                    taken.add(name)
            in_path = os.path.join(tmp.name, "named.onnx")
            big = proto.ByteSize() > 1_500_000_000
            onnx.save(proto, in_path, save_as_external_data=big, location="named.onnx.data" if big else None)
        excluded = [n.name for n in graph.node if cfg.exclude and re.search(cfg.exclude, n.name)]
        # quantize_dynamic rewrites a Gemm into a MatMul named "<gemm>_MatMul" before quantizing (even
        # with op_types=MatMul), so an excluded Gemm needs that name excluded too.
        n_excluded = len(excluded)
        gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
        excluded += [f"{name}_MatMul" for name in excluded if name in gemms]
        quantizable = set(op_types) | ({"Gemm"} if "MatMul" in op_types else set())
        candidates = sum(1 for n in graph.node if n.op_type in quantizable and n.name not in excluded)
        try:
            quantize_dynamic(in_path, out_path, op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                             reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded,
                             # fused com.microsoft ops (ort-optimize) defeat ONNX shape inference;
                             # their outputs are fp32, which is what the quantizer needs to know
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                             use_external_data_format=os.path.getsize(src.path) > 1_500_000_000)
            new = OrtModel(out_path, intra_op_threads=src.intra_op_threads,
                           graph_optimization=src.graph_optimization, keepalive=tmp)
        except Exception as exc:
            tmp.cleanup()
            raise PassApplyError(f"ort-quantize: quantize_dynamic failed: {type(exc).__name__}: {_first_lines(str(exc))}") from exc
        qgraph = onnx.load(out_path, load_external_data=False).graph
        qops = ("MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "ConvInteger", "DynamicQuantizeLinear", "QAttention")
        info: dict[str, Any] = {"op_types": cfg.op_types, "candidates": candidates, "excluded": n_excluded}
        for op in qops:
            count = sum(1 for n in qgraph.node if n.op_type == op)
            if count:
                info[f"nodes_{op}"] = count
        info.update({"file_bytes": new.model_bytes(), "file_bytes_before": src.model_bytes(), "provider": new.provider})
        if candidates == 0:
            return PassResult(new, modified=False, info=info | {"note": f"no {cfg.op_types} nodes to quantize"})
        return PassResult(new, modified=True, info=info)
