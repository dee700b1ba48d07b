"""`pt2e-int8`: int8 through PyTorch 2 export quantization and Inductor (form MODULE -> COMPILED).

The model is captured with `torch.export` on the workload's first calibration input, annotated by
torchao's `X86InductorQuantizer` (linear layers: int8 activations per tensor, int8 weights per
channel), calibrated on the workload's calibration batches (`mode=static`) or left to quantize its
activations per call (`mode=dynamic`), converted, and compiled by Inductor with freezing on. Freezing
is what lets Inductor's x86 quantization patterns replace each dequantize-linear-quantize group by one
oneDNN `qlinear_pointwise` call with the weight prepacked and the bias/GELU/residual add fused in
(VNNI, or AMX int8 tiles where the CPU has them).

`mixed=bf16` runs the ops left in float (attention, LayerNorm, softmax) in bf16 under autocast
("int8-mixed-bf16"); outputs are cast back to float32 either way.

The graph is compiled inside `apply` on a calibration batch (never evaluation data), so the report
can say which kernels run: `info["kernels"]` counts the extern calls in Inductor's generated code
(e.g. `onednn.qlinear_pointwise`), `info["fused_cpp_kernels"]` the generated C++ kernels.
Importing torchao's x86 quantizer registers its Inductor passes process-wide (they only rewrite
quantize/dequantize patterns, which other models do not contain).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Literal

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.pass_protocol import COMPILED, MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, all_of, need_packages

_EXTERN = re.compile(r"torch\.ops\.(onednn|mkldnn|mkl|aten|quantized|quantized_decomposed)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")
_CPP_KERNEL = re.compile(r"^(cpp_fused_\w+) = ", re.M)
# the same in Inductor's C++ wrapper (cpp_wrapper=true): calls through the AOTI shim, kernels declared extern "C"
_AOTI_CALL = re.compile(r"aoti_torch_cpu_(_?[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*)\(")
_CPP_KERNEL_DECL = re.compile(r'^extern "C"\s+void\s+(cpp_fused_\w+)\(', re.M)


@dataclasses.dataclass(frozen=True)
class Pt2eInt8Config(PassConfig):
    mode: Literal["static", "dynamic"] = "static"
    mixed: Literal["fp32", "bf16"] = "fp32"  # precision of the ops left unquantized
    calib_batches: int = 8
    dynamic_shapes: bool = False  # export batch/sequence axes as dynamic (else the calibration shape)
    cpp_wrapper: bool = False  # Inductor calls the graph's kernels from C++ (no Python per kernel)

    def __post_init__(self) -> None:
        check(1 <= self.calib_batches <= 1024, f"pt2e-int8: option 'calib_batches' must be in 1..1024, got {self.calib_batches}")


def kernel_counts(sources: list[str]) -> tuple[dict[str, int], int]:
    """(extern op -> calls, number of generated C++ kernels) in Inductor's output code."""
    ops: Counter[str] = Counter()
    fused: set[str] = set()
    for code in sources:
        ops.update(f"{ns}.{op}" for ns, op in _EXTERN.findall(code))
        ops.update(f"aoti.{op.lstrip('_')}" for op in _AOTI_CALL.findall(code))
        fused |= set(_CPP_KERNEL.findall(code)) | set(_CPP_KERNEL_DECL.findall(code))
    ignore = {"aten.empty_strided", "aten.as_strided", "aten.empty"}
    return {k: v for k, v in sorted(ops.items()) if k not in ignore}, len(fused)


def _float_outputs(obj: Any) -> Any:
    import torch

    from ..precision.cast import _map_tensors

    return _map_tensors(obj, lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t, inplace=True)


def _runner(graph: Any, mixed: str) -> Any:
    """The converted graph in a module whose forward (traced by Dynamo) enters autocast for `mixed=bf16`."""
    import torch

    class Pt2eInt8Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph_module = graph

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed == "bf16"):
                out = self.graph_module(*args, **kwargs)
            return out

    wrapper = Pt2eInt8Model()
    wrapper.training = False  # .eval() would recurse into the exported graph, which refuses train()/eval()
    return wrapper


class Pt2eInt8Pass(ConfiguredPass):
    """torch.export -> X86InductorQuantizer (static or dynamic) -> convert -> torch.compile(freezing)."""

    name = "pt2e-int8"
    Config = Pt2eInt8Config
    takes = frozenset({MODULE})
    gives = COMPILED
    lossy = True

    @staticmethod
    def unsavable_reason(info: dict[str, Any]) -> str:
        return ("holds a torch.export graph with int8 constants, which optistack does not serialize; "
                "save the model before pt2e-int8 and apply it again after loading")

    def requirements(self) -> Availability:
        import torch

        if not torch.backends.mkldnn.is_available():
            return Availability.no("pt2e-int8: this torch build has no oneDNN (mkldnn), which the x86 int8 kernels need")
        return all_of(need_packages("torchao", extra="quant"))

    def _calibration(self, ctx: PassContext) -> list[tuple[tuple, dict]]:
        from ...core.modeling import normalize_inputs

        out = []
        for item in ctx.calibration_inputs(self.config.calib_batches):
            args, kwargs = normalize_inputs(item)
            out.append((tuple(args), {k: v for k, v in kwargs.items() if v is not None}))
        if not out:
            raise PassApplyError("pt2e-int8: needs example inputs; the workload gives no calibration_inputs")
        return out

    def _export(self, model: Any, args: tuple, kwargs: dict) -> Any:
        import torch

        from ..export.onnx import _dynamic_spec

        shapes = None
        if self.config.dynamic_shapes:
            if args:
                raise PassApplyError("pt2e-int8: dynamic_shapes=true needs a workload that passes keyword inputs")
            spec, _ = _dynamic_spec(model, args, kwargs, dynamo=True)
            shapes = {k: spec[k] for k in kwargs}
        try:
            return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=shapes, strict=False).module()
        except Exception as exc:  # export errors come in many types
            first = " ".join(str(exc).split())[:600]
            raise PassApplyError(f"pt2e-int8: torch.export could not capture the model: {type(exc).__name__}: {first}") from exc

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch
        from torch._inductor.utils import run_and_get_code
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        from ..compile.inductor import patch_when_compiling

        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"pt2e-int8: expected a torch.nn.Module, got {type(model).__name__}")
        cfg = self.config
        model = model.eval()
        batches = self._calibration(ctx)
        args, kwargs = batches[0]
        with torch.no_grad():
            graph = self._export(model, args, kwargs)
            quantizer = xiq.X86InductorQuantizer()
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=cfg.mode == "dynamic"))
            prepared = prepare_pt2e(graph, quantizer)
            for a, kw in batches if cfg.mode == "static" else batches[:1]:
                prepared(*a, **kw)
            converted = convert_pt2e(prepared)
            move_exported_model_to_eval(converted)
        n_quant = sum(1 for n in converted.graph.nodes
                      if n.op == "call_function" and "quantize_per_channel" in str(n.target))
        if n_quant == 0:
            raise PassApplyError("pt2e-int8: the x86 quantizer annotated no layer (no per-channel int8 weights); "
                                 "the model has no linear/conv layers it knows")
        compiled = torch.compile(_runner(converted, cfg.mixed))
        patch_when_compiling(compiled, freezing=True, **({"cpp_wrapper": True} if cfg.cpp_wrapper else {}))
        try:
            with torch.no_grad():
                _, sources = run_and_get_code(compiled, *args, **kwargs)
        except Exception as exc:
            raise PassApplyError(f"pt2e-int8: Inductor could not compile the quantized graph: "
                                 f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}") from exc
        _add_float_outputs(compiled)
        ops, fused = kernel_counts(sources)
        int8_calls = sum(v for k, v in ops.items() if "qlinear" in k or "qconv" in k)
        info: dict[str, Any] = {
            "mode": cfg.mode, "mixed": cfg.mixed, "int8_weights": n_quant,
            "calib_batches": len(batches) if cfg.mode == "static" else 0,
            "int8_kernel_calls": int8_calls, "fused_cpp_kernels": fused,
            "kernels": ", ".join(f"{k} x{v}" for k, v in ops.items()),
            "amx_int8": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "freezing": True, "cpp_wrapper": cfg.cpp_wrapper,
        }
        return PassResult(compiled, modified=True, info=info)


def _add_float_outputs(compiled: Any) -> None:
    forward = compiled.forward

    def float_forward(*args: Any, **kwargs: Any) -> Any:
        return _float_outputs(forward(*args, **kwargs))

    compiled.forward = float_forward
