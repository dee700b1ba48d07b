"""`onnx-export`: export a torch module to ONNX and run it with ONNX Runtime (form MODULE -> ONNX).

The exporter needs example inputs: the first of `ctx.workload.calibration_inputs(1)` (never the
evaluation data). The .onnx file lives in a temp dir owned by the returned `OrtModel`, which is kept
alive as long as the model is. After export the session is run on the same inputs and compared with
torch; a max abs difference over `atol * max(1, max|torch output|)` is a PassApplyError with the numbers.

`exporter=dynamo` (torch.export + onnxscript) falls back to the TorchScript-based `legacy` exporter if
it fails; `info["exporter"]` says which one produced the file and `info["fallback"]` why.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import tempfile
from typing import Any, Literal

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ONNX, ConfiguredPass, PassContext, PassResult
from ...core.quiet import quiet_import
from ...core.requirements import Availability, all_of, need_packages


@dataclasses.dataclass(frozen=True)
class OnnxExportConfig(PassConfig):
    opset: int = 18
    exporter: Literal["dynamo", "legacy"] = "dynamo"
    dynamic: bool = True
    atol: float = 1e-4
    intra_op_threads: int = 0
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    attn_implementation: Literal["", "eager", "sdpa"] = ""  # transformers models: the attention code exported
    # the dynamo graph's clean-up: "fold" (constant folding, unused nodes dropped), "full" (onnxscript's whole
    # optimizer, torch's default: its rewrite rules took 12-28 of SmolLM2's export seconds and did not change
    # ONNX Runtime's latency, docs/export.md) or "none"
    optimize: Literal["fold", "full", "none"] = "fold"

    def __post_init__(self) -> None:
        check(7 <= self.opset <= 25, f"onnx-export: option 'opset' must be in 7..25, got {self.opset}")
        check(self.atol > 0, f"onnx-export: option 'atol' must be > 0, got {self.atol}")
        check(self.intra_op_threads >= 0, f"onnx-export: option 'intra_op_threads' must be >= 0, got {self.intra_op_threads}")


def example_inputs(ctx: PassContext, who: str) -> tuple[tuple, dict]:
    """(args, kwargs) from the workload's calibration inputs; a PassApplyError if there are none."""
    from ...core.modeling import normalize_inputs

    found = ctx.calibration_inputs(1)
    if not found:
        raise PassApplyError(f"{who}: needs example inputs; the workload gives no calibration_inputs")
    args, kwargs = normalize_inputs(found[0])
    return tuple(args), {k: v for k, v in kwargs.items() if v is not None}


def source_facts(model: Any) -> dict[str, Any]:
    """model_type / num_heads / hidden_size of a transformers model (the BERT fusions need them)."""
    config = getattr(model, "config", None)
    facts = {"model_type": getattr(config, "model_type", None),
             "num_heads": getattr(config, "num_attention_heads", None),
             "hidden_size": getattr(config, "hidden_size", None)}
    return {k: v for k, v in facts.items() if v is not None}


def use_attention(model: Any, impl: str) -> None:
    """Switch a transformers model's attention code (the runner handed us a private copy).

    `eager` writes attention as plain MatMul/Softmax ops: with `exporter=legacy` that is the pattern
    ONNX Runtime's BERT fuser turns into Attention with a mask index, which its int8 quantizer can
    then make QAttention (see docs/export.md)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise PassApplyError(f"onnx-export: option 'attn_implementation' needs a transformers model; got {type(model).__name__}")
    setter(impl)


def hf_export_kwargs(model: Any, kwargs: dict) -> dict:
    """A transformers causal LM would also return its KV cache: export logits only (use_cache=False)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


def compare_outputs(ref: Any, got: Any) -> tuple[float, float]:
    """(max abs difference, max abs reference value) over all outputs, or over the first if counts differ."""
    import torch

    from ...core.modeling import flatten_outputs

    a, b = flatten_outputs(ref), flatten_outputs(got)
    if a.shape != b.shape:
        first = lambda o: o if isinstance(o, torch.Tensor) else (o[0] if isinstance(o, (tuple, list)) else next(iter(o.values())))  # noqa: E731
        a, b = flatten_outputs(first(ref)), flatten_outputs(first(got))
    if a.shape != b.shape:
        raise PassApplyError(f"ONNX outputs have {b.numel()} values, torch gave {a.numel()}")
    return (a - b).abs().max().item(), a.abs().max().item()


def check_against(who: str, ref: Any, got: Any, atol: float) -> dict[str, float]:
    diff, scale = compare_outputs(ref, got)
    bound = atol * max(1.0, scale)
    if not diff <= bound:  # also catches NaN
        raise PassApplyError(
            f"{who}: ONNX Runtime output differs from torch by max abs {diff:.3g} > {bound:.3g} "
            f"(atol={atol:g} x max(1, max|output|={scale:.3g}))"
        )
    return {"max_abs_diff": float(diff), "max_rel_diff": float(diff / scale) if scale > 0 else float(diff)}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    r"(aten::[\w.]+)", r"(aten\.[\w.]+)", r"(torch\.ops\.[\w.]+)", r"operator '?([\w:.]+)'?",
    r"Unsupported .*?'([\w:.]+)'",
)


def unsupported_op(text: str) -> str | None:
    for pat in _OP_PATTERNS:
        m = re.search(pat, text)
        if m:
            return m.group(1)
    return None


def _dynamic_spec(model: Any, args: tuple, kwargs: dict, dynamo: bool) -> Any:
    import torch

    def axes(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        n = min(t.dim(), 2)  # batch and sequence axes
        if dynamo:
            return {i: torch.export.Dim.DYNAMIC for i in range(n)}
        return {i: ("batch" if i == 0 else "sequence") for i in range(n)}

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = params[: len(args)] if len(params) >= len(args) else [f"input_{i}" for i in range(len(args))]
    spec = {n: axes(a) for n, a in zip(names, args)}
    spec.update({k: axes(v) for k, v in kwargs.items()})
    return spec, names


def _fold(graph_model: Any) -> None:
    """Constant folding (weights' transposes become initializers, which `ort-quantize` needs), then unused
    nodes dropped and constants lifted to initializers: the part of onnxscript's optimizer that changes what
    later passes see, without its pattern rewrites."""
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    fold_constants(graph_model)
    common.RemoveUnusedNodesPass()(graph_model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph_model)


class OnnxExportPass(ConfiguredPass):
    """torch.onnx.export (dynamo, else legacy) -> file in a temp dir -> `OrtModel`, checked against torch."""

    name = "onnx-export"
    Config = OnnxExportConfig
    takes = frozenset({MODULE})
    gives = ONNX

    def requirements(self) -> Availability:
        from .session import one_onnxruntime

        checks = [need_packages("onnx", "onnxruntime", extra="onnx"), one_onnxruntime()]
        if self.config.exporter == "dynamo":
            checks.append(need_packages("onnxscript", extra="onnx"))
        return all_of(*checks)

    def _export(self, model: Any, args: tuple, kwargs: dict, path: str, exporter: str) -> None:
        import torch

        cfg = self.config
        dynamo = exporter == "dynamo"
        spec, arg_names = _dynamic_spec(model, args, kwargs, dynamo)
        common = dict(opset_version=cfg.opset, dynamo=dynamo, verbose=False)
        if dynamo:
            shapes = {k: v for k, v in spec.items()} if cfg.dynamic else None
            prog = torch.onnx.export(model, args, None, kwargs=dict(kwargs) or None, dynamic_shapes=shapes,
                                     external_data=False, optimize=cfg.optimize == "full", **common)
            if cfg.optimize == "fold":
                _fold(prog.model)
            prog.save(path, external_data=_too_big(model))
        else:
            tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            constants = {k: v for k, v in kwargs.items() if k not in tensors}  # e.g. use_cache=False
            names = list(arg_names) + list(tensors)
            dyn = {k: v for k, v in spec.items() if v and k in names} if cfg.dynamic else None
            # The TorchScript exporter mishandles keyword inputs: feed them positionally through an adapter.
            full = tuple(args) + tuple(tensors.values())
            adapter = _Positional(model, len(args), list(tensors), constants)
            torch.onnx.export(adapter, full, path, input_names=names, dynamic_axes=dyn, **common)

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import os

        import torch

        from .session import OrtModel

        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"onnx-export: expected a torch.nn.Module, got {type(model).__name__}")
        cfg = self.config
        model = model.eval()
        if cfg.attn_implementation:
            use_attention(model, cfg.attn_implementation)
        args, kwargs = example_inputs(ctx, self.name)
        kwargs = hf_export_kwargs(model, kwargs)
        with torch.inference_mode():
            reference = model(*args, **kwargs)
        tmp = tempfile.TemporaryDirectory(prefix="optistack-onnx-")
        path = os.path.join(tmp.name, "model.onnx")
        info: dict[str, Any] = {"opset": cfg.opset, "dynamic": cfg.dynamic}
        order = [cfg.exporter] + (["legacy"] if cfg.exporter == "dynamo" else [])
        errors: list[str] = []
        ops: list[str] = []
        for exporter in order:
            try:
                with quiet_import():  # the exporters' registration chatter and deprecation warnings
                    self._export(model, args, kwargs, path, exporter)
                info["exporter"] = exporter
                break
            except Exception as exc:  # exporter errors come in many types
                full = _ANSI.sub("", f"{exc} {exc.__cause__ or ''}")
                errors.append(f"{exporter}: {type(exc).__name__}: {_first_lines(full)}")
                op = unsupported_op(full)
                if op and op not in ops:
                    ops.append(op)
        else:
            tmp.cleanup()
            text = " | ".join(errors)
            where = f" (unsupported op {', '.join(ops)})" if ops else ""
            raise PassApplyError(f"onnx-export: export failed{where}: {text}")
        if len(errors) and info["exporter"] != cfg.exporter:
            info["fallback"] = f"{cfg.exporter} exporter failed, used {info['exporter']}: {errors[0][:300]}"
        try:
            ort_model = OrtModel(path, intra_op_threads=cfg.intra_op_threads, keepalive=tmp,
                                 provider=cfg.provider, meta=source_facts(model))
            got = ort_model(*args, **kwargs)
        except Exception as exc:
            tmp.cleanup()
            raise PassApplyError(f"onnx-export: ONNX Runtime could not run the exported model: "
                                 f"{type(exc).__name__}: {_first_lines(str(exc))}") from exc
        info.update(check_against(self.name, reference, got, cfg.atol))
        info.update({"file_bytes": ort_model.model_bytes(), "provider": ort_model.provider})
        return PassResult(ort_model, modified=True, info=info)


class _Positional:  # built lazily below so importing this module does not import torch
    def __new__(cls, model: Any, n_args: int, kw_names: list[str], constants: dict | None = None):
        import torch

        class Positional(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, *inputs: Any) -> Any:
                return self.inner(*inputs[:n_args], **dict(zip(kw_names, inputs[n_args:])), **(constants or {}))

        # eval(): the exporter restores the wrapper's train/eval mode afterwards, recursively, so a
        # wrapper left in training mode would switch the wrapped model's dropout on.
        return Positional().eval()


def _too_big(model: Any) -> bool:
    """Protobuf caps a single file at 2 GB: keep weights in a side file above ~1.5 GB."""
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters()) > 1_500_000_000
    except Exception:
        return False


def _first_lines(text: str, n: int = 6, limit: int = 800) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[:n] if line.strip())[:limit]
