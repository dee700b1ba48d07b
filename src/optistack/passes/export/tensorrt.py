"""`tensorrt`: build a TensorRT engine from the exported ONNX graph and run it (form ONNX -> ENGINE).

Written against the TensorRT Python API (10.x and 11.x). TensorRT 11 builds strongly typed networks
only: the precision flags of 10.x are gone, so reduced precision has to be in the graph itself.
This pass therefore
- `precision=fp32`: builds the graph as exported;
- `precision=fp16`: converts the graph to fp16 with inputs/outputs kept fp32 (ONNX Runtime's float16
  converter) — works on 10.x and 11.x; on 10.x the FP16 flag is set too;
- `precision=bf16`: needs a graph exported from a bf16 model on 11.x (`cast{dtype=bf16}` before
  `onnx-export`); on 10.x the BF16 flag is set;
- `precision=int8|fp8`: explicit quantization only: the graph must carry QuantizeLinear/
  DequantizeLinear nodes (e.g. `ort-quantize{mode=static}` for int8); refused with that advice if not.

Dynamic axes get one optimization profile (min/opt/max per axis, from options or the example input).
Engines are cached on disk by a hash of the graph bytes, the build options, the TensorRT version and
the GPU, so a second run skips the (minutes-long) build. `EngineModel` runs the engine behind the
workload's calling convention: torch tensors in, torch CUDA tensors out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

from ...core import load_schema
from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.load_registry import register_runtime
from ...core.pass_protocol import ENGINE, ONNX, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, all_of, need_cuda, need_packages
from .onnx import _first_lines, check_against, example_inputs

_PROFILE = re.compile(r"^$|^\d+:\d+:\d+$")


@dataclasses.dataclass(frozen=True)
class TensorRTConfig(PassConfig):
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = "fp16"
    workspace_gb: float = 4.0
    batch: str = ""  # min:opt:max of axis 0 of every dynamic input; "" = 1:example:example
    seq: str = ""  # min:opt:max of axis 1; "" = 1:example:example
    cache_dir: str = ""  # "" = ~/.cache/optistack/tensorrt
    atol: float = 5e-2

    def __post_init__(self) -> None:
        check(self.workspace_gb > 0, f"tensorrt: option 'workspace_gb' must be > 0, got {self.workspace_gb}")
        check(self.atol > 0, f"tensorrt: option 'atol' must be > 0, got {self.atol}")
        for option in ("batch", "seq"):
            text = getattr(self, option)
            check(bool(_PROFILE.match(text)),
                  f"tensorrt: option '{option}' must be 'min:opt:max' (e.g. 1:8:32) or empty, got {text!r}")
            if text:
                lo, opt, hi = (int(v) for v in text.split(":"))
                check(1 <= lo <= opt <= hi, f"tensorrt: option '{option}' needs 1 <= min <= opt <= max, got {text!r}")


def profile_shapes(shape: tuple[int, ...], dynamic: tuple[bool, ...], batch: str, seq: str) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) for one input: dynamic axes 0/1 from the options or 1:example:example."""
    lo, opt, hi = list(shape), list(shape), list(shape)
    for axis, text in ((0, batch), (1, seq)):
        if axis < len(shape) and dynamic[axis]:
            a, b, c = (int(v) for v in text.split(":")) if text else (1, shape[axis], shape[axis])
            lo[axis], opt[axis], hi[axis] = a, b, c
    return tuple(lo), tuple(opt), tuple(hi)


def engine_key(onnx_bytes: bytes, cfg: TensorRTConfig, shapes: dict, trt_version: str, gpu: str) -> str:
    h = hashlib.sha256(onnx_bytes)
    h.update(repr((cfg.precision, cfg.workspace_gb, sorted(shapes.items()), trt_version, gpu)).encode())
    return h.hexdigest()[:24]


class TensorRTPass(ConfiguredPass):
    """ONNX graph -> (cached) TensorRT engine -> `EngineModel`, checked against the ONNX model."""

    name = "tensorrt"
    Config = TensorRTConfig
    takes = frozenset({ONNX})
    gives = ENGINE
    lossy = True  # fp16/int8/fp8 change numerics; the accuracy gate decides

    def requirements(self) -> Availability:
        return all_of(need_packages("tensorrt", extra="tensorrt"), need_cuda(),
                      need_packages("onnx", extra="onnx"))

    def _graph_bytes(self, path: str) -> bytes:
        import onnx

        proto = onnx.load(path)
        if self.config.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(proto, keep_io_types=True)
        if self.config.precision in ("int8", "fp8") and not any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            raise PassApplyError(
                f"tensorrt: precision={self.config.precision} needs explicit quantization (QuantizeLinear/"
                "DequantizeLinear nodes in the graph); put ort-quantize{mode=static} before tensorrt, "
                "or use precision=fp16")
        return proto.SerializeToString()

    def _build(self, trt: Any, graph: bytes, shapes: dict) -> bytes:
        cfg = self.config
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and cfg.precision not in ("bf16",):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graph):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise PassApplyError(f"tensorrt: the ONNX parser refused the graph: {_first_lines(errors)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
        legacy_flag = {"bf16": "BF16", "int8": "INT8", "fp8": "FP8", "fp16": "FP16"}.get(cfg.precision)
        if legacy_flag and hasattr(trt.BuilderFlag, legacy_flag) and not flags:
            config.set_flag(getattr(trt.BuilderFlag, legacy_flag))  # TensorRT 10.x weak typing
        elif cfg.precision == "bf16" and not hasattr(trt.BuilderFlag, "BF16"):
            raise PassApplyError("tensorrt: precision=bf16 on TensorRT 11 needs a bf16 graph: "
                                 "put cast{dtype=bf16} before onnx-export")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise PassApplyError("tensorrt: build_serialized_network failed (see the TensorRT log above)")
        return bytes(serialized)

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import tensorrt as trt
        import torch

        from .session import OrtModel

        if not isinstance(model, OrtModel):
            raise PassApplyError(f"tensorrt: expected an ONNX model from onnx-export, got {type(model).__name__}")
        cfg = self.config
        args, kwargs = example_inputs(ctx, self.name)
        feed = model.feed_arrays(args, kwargs)
        graph = self._graph_bytes(model.path)
        shapes = {name: profile_shapes(tuple(arr.shape), model.dynamic_axes(name), cfg.batch, cfg.seq)
                  for name, arr in feed.items()}
        gpu = f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}"
        key = engine_key(graph, cfg, shapes, trt.__version__, gpu)
        cache = Path(cfg.cache_dir or Path.home() / ".cache" / "optistack" / "tensorrt")
        path = cache / f"{key}.engine"
        cached = path.exists()
        if cached:
            serialized = path.read_bytes()
        else:
            serialized = self._build(trt, graph, shapes)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(serialized)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half an engine
        engine = EngineModel(serialized, model.output_names, str(path))
        info: dict[str, Any] = {"precision": cfg.precision, "engine_cached": cached, "engine_file": str(path),
                                "engine_bytes": len(serialized), "tensorrt": trt.__version__, "gpu": gpu}
        info.update(check_against(self.name, model(*args, **kwargs), engine(*args, **kwargs), cfg.atol))
        return PassResult(engine, modified=True, info=info)


class EngineModel:
    """A deserialized TensorRT engine called like the torch model: tensors in, CUDA tensors out."""

    def __init__(self, serialized: bytes, output_names: list[str], path: str = "") -> None:
        import tensorrt as trt
        import torch

        self.device = torch.device("cuda")
        self.path = path
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise PassApplyError("tensorrt: the engine could not be deserialized (TensorRT or GPU changed?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.input_names]
        self.output_names = [n for n in output_names if n in outputs] + [n for n in outputs if n not in output_names]
        self._dtype = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        named = {k: v for k, v in kwargs.items() if k in self.input_names and v is not None}
        free = [n for n in self.input_names if n not in named]
        named.update(zip(free, args))
        missing = [n for n in self.input_names if n not in named]
        if missing:
            raise TypeError(f"EngineModel: the engine needs input(s) {missing}")
        keep = []
        for name in self.input_names:
            t = torch.as_tensor(named[name]).to(self.device, self._dtype[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("EngineModel: TensorRT execute_async_v3 failed")
        stream.synchronize()
        outs = [o.float() if o.dtype in (torch.float16, torch.bfloat16) else o for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def session_options(self) -> dict[str, Any]:
        return {"output_names": self.output_names}

    def save_to(self, folder: str) -> str:
        """Copy the serialized engine (it only runs on the same TensorRT version and GPU model)."""
        import shutil

        os.makedirs(folder, exist_ok=True)
        shutil.copy2(self.path, os.path.join(folder, "model.engine"))
        return "model.engine"

    @classmethod
    def load_from(cls, folder: str, file: str, options: dict[str, Any]) -> "EngineModel":
        """The engine `save_to` wrote (`optistack.load`); `output_names` is the only option taken."""
        names = options.get("output_names")
        if set(options) != {"output_names"} or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"EngineModel: options must be exactly {{'output_names': [str, ...]}}, got keys {sorted(options)}")
        path = os.path.join(folder, file)
        return cls(Path(path).read_bytes(), list(names), path)

    def model_bytes(self) -> int:
        return os.path.getsize(self.path) if self.path and os.path.exists(self.path) else 0

    def __repr__(self) -> str:
        return f"<EngineModel {os.path.basename(self.path)}>"


def _torch_dtype(trt_dtype: Any) -> Any:
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, dtype in (("int64", torch.int64), ("bf16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = dtype
    return table[trt_dtype]


register_runtime(EngineModel, {"output_names": load_schema.list_of(load_schema.text(1024), 4096)}, required=("output_names",))
