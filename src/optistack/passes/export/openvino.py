"""`openvino`: convert a torch module (or an exported ONNX graph) with OpenVINO and run it on the CPU
plugin (form MODULE/ONNX -> ENGINE).

- `precision=f32|bf16|f16` is OpenVINO's inference-precision hint. It is always set: on CPUs with
  AMX/AVX512-BF16 OpenVINO's own default is bf16, so "f32" has to be asked for.
- `quantize=int8` runs NNCF post-training quantization (transformer preset) on the workload's
  calibration inputs before compiling; the ops NNCF leaves in float run at `precision`.
- `threads` (0 = OpenVINO's default, every physical core), `hint=latency|throughput` and `pinning`.
  Pinning is off unless asked for: pinned OpenVINO worker threads share the cores with the torch
  threads of the model it is timed against, the same reason the ONNX Runtime passes turn spinning off.

`OvModel` keeps the converted (uncompiled) `openvino.Model` for `save_to` (IR: model.xml + model.bin,
plain data that cannot run code) and one infer request, fed by input name like `OrtModel`: torch
tensors or numpy arrays in, torch tensors out (one tensor for one output, else a tuple).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.load_registry import register_runtime
from ...core.load_schema import boolean, choice, integer
from ...core.pass_protocol import ENGINE, MODULE, ONNX, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, all_of, need_packages
from .graph_files import ir_references
from .onnx import _first_lines, check_against, example_inputs, hf_export_kwargs

_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
# What `session_options` writes and `load_from` takes back.
_LOADED_OPTIONS = ("precision", "threads", "hint", "pinning")


@dataclasses.dataclass(frozen=True)
class OpenVINOConfig(PassConfig):
    precision: Literal["f32", "bf16", "f16"] = "f32"
    quantize: Literal["none", "int8"] = "none"
    calib_batches: int = 8  # NNCF calibration batches from the workload (quantize=int8)
    threads: int = 0  # 0 = OpenVINO's default (every physical core)
    hint: Literal["latency", "throughput"] = "latency"
    pinning: bool = False
    static: bool = False  # fix the input shapes to the example's (no dynamic-shape code paths)
    atol: float = 0.1  # output check against the source model, relative to max(1, max|output|)

    def __post_init__(self) -> None:
        check(self.threads >= 0, f"openvino: option 'threads' must be >= 0 (0 = OpenVINO's default), got {self.threads}")
        check(1 <= self.calib_batches <= 1024, f"openvino: option 'calib_batches' must be in 1..1024, got {self.calib_batches}")
        check(self.atol > 0, f"openvino: option 'atol' must be > 0, got {self.atol}")


def compile_options(precision: str, threads: int, hint: str, pinning: bool) -> dict[str, Any]:
    """The CPU plugin properties for these settings (also what a reloaded model is compiled with)."""
    opts: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _PRECISIONS[precision],
                            "PERFORMANCE_HINT": hint.upper(), "ENABLE_CPU_PINNING": bool(pinning)}
    if threads > 0:
        opts["INFERENCE_NUM_THREADS"] = int(threads)
    return opts


class OvModel:
    """An OpenVINO model compiled for the CPU, called like the torch model it came from."""

    device = None  # set in __init__ (torch imported lazily); inputs are handed over on CPU

    def __init__(self, model: Any, *, precision: str = "f32", threads: int = 0, hint: str = "latency",
                 pinning: bool = False) -> None:
        import openvino as ov
        import torch

        if precision not in _PRECISIONS:
            raise ValueError(f"OvModel: precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
        if hint not in ("latency", "throughput"):
            raise ValueError(f"OvModel: hint must be latency or throughput, got {hint!r}")
        self.device = torch.device("cpu")
        self.model = model
        self.precision, self.threads, self.hint, self.pinning = precision, int(threads), hint, bool(pinning)
        self.compiled = ov.Core().compile_model(model, "CPU", compile_options(precision, self.threads, hint, self.pinning))
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self._np_types = [port.get_element_type().to_dtype() for port in self.compiled.inputs]
        self.output_names = [next(iter(port.get_names()), f"output_{i}") for i, port in enumerate(self.compiled.outputs)]

    def runtime_facts(self) -> dict[str, Any]:
        """What the CPU plugin really chose (precision, threads, streams), for the report."""
        facts = {}
        for key, prop in (("inference_precision", "INFERENCE_PRECISION_HINT"), ("threads_used", "INFERENCE_NUM_THREADS"),
                          ("streams", "NUM_STREAMS"), ("pinning_used", "ENABLE_CPU_PINNING")):
            try:
                value = self.compiled.get_property(prop)
                facts[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
            except Exception:
                pass
        return facts

    def _feed(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        import numpy as np
        import torch

        named = {k: v for k, v in kwargs.items() if k in self.input_names and v is not None}
        free = [n for n in self.input_names if n not in named]
        if len(args) > len(free):
            raise TypeError(f"OvModel: got {len(args)} positional inputs, the model has {len(free)} free inputs {free}")
        named.update(zip(free, args))
        missing = [n for n in self.input_names if n not in named]
        if missing:
            raise TypeError(f"OvModel: the model needs input(s) {missing}; got {sorted(kwargs)} and {len(args)} positional")
        feed = {}
        for name, want in zip(self.input_names, self._np_types):
            value = named[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value)
            feed[name] = arr if arr.dtype == want else arr.astype(want)
        return feed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        result = self.request.infer(self._feed(args, kwargs), share_inputs=True, share_outputs=False)
        tensors = tuple(torch.from_numpy(result[port]) for port in self.compiled.outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def session_options(self) -> dict[str, Any]:
        return {"precision": self.precision, "threads": self.threads, "hint": self.hint, "pinning": self.pinning}

    def save_to(self, folder: str) -> list[str]:
        """OpenVINO IR: model.xml (the graph) then model.bin (the weights), as OpenVINO writes them."""
        import openvino as ov

        os.makedirs(folder, exist_ok=True)
        ov.save_model(self.model, os.path.join(folder, "model.xml"), compress_to_fp16=False)
        return ["model.xml", "model.bin"]

    @classmethod
    def load_from(cls, folder: str, file: str, options: dict[str, Any]) -> "OvModel":
        """The IR `save_to` wrote, compiled with the saved options (only the keys `session_options` writes)."""
        import openvino as ov

        unknown = sorted(set(options) - set(_LOADED_OPTIONS))
        if unknown:
            raise ValueError(f"OvModel: option(s) {', '.join(map(repr, unknown))} are not loaded from a saved folder "
                             f"(allowed: {', '.join(_LOADED_OPTIONS)})")
        xml = os.path.join(folder, file)
        return cls(ov.Core().read_model(xml, os.path.splitext(xml)[0] + ".bin"), **options)

    def model_bytes(self) -> int:
        """Bytes of the weights the model holds (the IR's .bin size)."""
        total = 0
        for op in self.model.get_ordered_ops():
            if op.get_type_name() == "Constant":
                total += op.get_byte_size()
        return total

    def __repr__(self) -> str:
        return f"<OvModel {self.precision} on CPU>"


def _convert(model: Any, args: tuple, kwargs: dict) -> Any:
    """torch module or OrtModel -> openvino.Model."""
    import openvino as ov
    import torch

    from .session import OrtModel

    if isinstance(model, OrtModel):
        return ov.Core().read_model(model.path)
    if not isinstance(model, torch.nn.Module):
        raise PassApplyError(f"openvino: expected a torch.nn.Module or an ONNX model from onnx-export, "
                             f"got {type(model).__name__}")
    if args and kwargs:
        raise PassApplyError("openvino: the workload's example inputs mix positional and keyword arguments; "
                             "OpenVINO's converter takes one or the other (export to ONNX first: onnx-export,openvino)")
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if kwargs.get("use_cache") is False and hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # a private copy: the converter traces tensors only, no flags
    example = tensors if tensors else (args[0] if len(args) == 1 else tuple(args))
    with torch.no_grad():
        return ov.convert_model(model, example_input=example)


def _quantize(ov_model: Any, ctx: PassContext, feed_of: Any, n: int) -> tuple[Any, int]:
    import nncf

    from ...core.modeling import normalize_inputs

    batches = []
    for item in ctx.calibration_inputs(n):
        a, kw = normalize_inputs(item)
        batches.append(feed_of(tuple(a), {k: v for k, v in kw.items() if v is not None}))
    if not batches:
        raise PassApplyError("openvino: quantize=int8 needs calibration data; the workload gives no calibration_inputs")
    quantized = nncf.quantize(ov_model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=sum(1 for _ in batches))
    return quantized, len(batches)


class OpenVINOPass(ConfiguredPass):
    """torch module / ONNX graph -> openvino.Model (NNCF int8 optional) -> compiled for CPU -> `OvModel`."""

    name = "openvino"
    Config = OpenVINOConfig
    takes = frozenset({MODULE, ONNX})
    gives = ENGINE
    lossy = True  # bf16/f16/int8 change numerics; the accuracy gate decides

    def requirements(self) -> Availability:
        checks = [need_packages("openvino", extra="openvino")]
        if self.config.quantize == "int8":
            checks.append(need_packages("nncf", extra="openvino"))
        return all_of(*checks)

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import openvino as ov
        import torch

        cfg = self.config
        args, kwargs = example_inputs(ctx, self.name)
        if isinstance(model, torch.nn.Module):
            model = model.eval()
            kwargs = hf_export_kwargs(model, kwargs)
        with torch.inference_mode():
            reference = model(*args, **kwargs)
        try:
            ov_model = _convert(model, args, kwargs)
        except PassApplyError:
            raise
        except Exception as exc:  # the converter raises many types
            raise PassApplyError(f"openvino: conversion failed: {type(exc).__name__}: {_first_lines(str(exc))}") from exc
        info: dict[str, Any] = {"precision": cfg.precision, "quantize": cfg.quantize, "openvino": ov.get_version()}
        if cfg.static:
            probe = OvModel(ov_model, precision="f32", threads=1)
            feed = probe._feed(args, kwargs)
            ov_model.reshape({name: list(arr.shape) for name, arr in feed.items()})
        if cfg.quantize == "int8":
            probe = OvModel(ov_model, precision="f32", threads=cfg.threads or 0)
            ov_model, used = _quantize(ov_model, ctx, probe._feed, cfg.calib_batches)
            info["calib_batches"] = used
        try:
            engine = OvModel(ov_model, precision=cfg.precision, threads=cfg.threads, hint=cfg.hint, pinning=cfg.pinning)
            got = engine(*args, **kwargs)
        except Exception as exc:
            raise PassApplyError(f"openvino: the CPU plugin could not compile or run the model: "
                                 f"{type(exc).__name__}: {_first_lines(str(exc))}") from exc
        info.update(check_against(self.name, reference, got, cfg.atol))
        info.update(engine.runtime_facts())
        info["weight_bytes"] = engine.model_bytes()
        return PassResult(engine, modified=True, info=info)


register_runtime(OvModel, {"precision": choice(*_PRECISIONS), "threads": integer(0, 4096),
                           "hint": choice("latency", "throughput"), "pinning": boolean}, references=ir_references)
