"""Modules the `fuse-kernels` pass swaps in: each calls one backend's kernels (see reference.py).

`backend` names a module with the reference.py API: "cpu-cpp" (cpu.py), "triton" (triton/),
"cuda" (cuda.py) or "torch" (reference.py). All three modules save and load through optistack's
persist (`optistack_spec` / `from_optistack_spec`, registered with core.load_registry below); the int4
layout is the backend's own, so the spec records the buffers' shapes and dtypes and a load rebuilds
them empty before the state dict.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.load_registry import FEATURES, LINEAR_FIELDS, register_module, required_keys
from ..core.load_schema import choice, dtype_name, integer, number, optional, record, short, text
from ..core.load_schema import shape as shape_check
from .backend import BACKENDS as BACKEND_MODULES

_loaded: dict[str, Any] = {}


def backend_module(name: str) -> Any:
    """The backend's Python module, a `KernelBackend` (imported once; ImportError if it is not installed)."""
    mod = _loaded.get(name)
    if mod is None:
        if name not in BACKEND_MODULES:
            raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKEND_MODULES)}")
        mod = _loaded[name] = importlib.import_module(BACKEND_MODULES[name])
    return mod


class FusedRMSNorm(nn.Module):
    """RMSNorm (Llama semantics) in one kernel: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "torch", dtype: Any = None,
                 device: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.variance_epsilon, self.backend = float(eps), backend
        backend_module(backend)  # fail early on an unknown name; looked up per call (deepcopy-safe)

    @classmethod
    def from_module(cls, norm: nn.Module, backend: str) -> "FusedRMSNorm":
        new = cls(norm.weight.shape[0], norm.variance_epsilon, backend, device="meta")
        new.weight = nn.Parameter(norm.weight.detach(), requires_grad=norm.weight.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return backend_module(self.backend).rms_norm(x, self.weight, self.variance_epsilon)

    def optistack_spec(self) -> dict:
        return {"hidden_size": self.weight.shape[0], "eps": self.variance_epsilon, "backend": self.backend,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "FusedRMSNorm":
        return cls(spec["hidden_size"], spec["eps"], spec["backend"], dtype=getattr(torch, spec["dtype"]))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, backend={self.backend}"


class FusedInt4Linear(nn.Module):
    """y = x W^T + b with W in a backend's own packed int4 layout (`int4_prepack`), stored as buffers
    `packed_<key>`. `in_features` is the real input width; the packed one may be padded (zeros)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, packed_k: int, backend: str,
                 buffers: dict[str, tuple[list[int], str]], bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.packed_k, self.backend = group_size, packed_k, backend
        backend_module(backend)  # fail early on an unknown name; looked up per call (deepcopy-safe)
        self._keys = sorted(buffers)
        for key, (shape, dtype) in buffers.items():
            self.register_buffer(f"packed_{key}", torch.empty(shape, dtype=getattr(torch, dtype)))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_parts(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   in_features: int, bias: torch.Tensor | None, backend: str) -> "FusedInt4Linear":
        """codes uint8 [N, Kp] (Kp >= in_features, a multiple of group_size), scale/zero [N, Kp/g]."""
        packed = backend_module(backend).int4_prepack(codes, scale, zero, group_size)
        spec = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in packed.items()}
        new = cls(in_features, codes.shape[0], group_size, codes.shape[1], backend, spec, bias is not None)
        for key, value in packed.items():
            setattr(new, f"packed_{key}", value)
        if bias is not None:
            new.bias = bias.detach().clone()
        return new

    def packed(self) -> dict[str, torch.Tensor]:
        buffers = self._buffers  # direct: nn.Module.__getattr__ costs ~0.3 us a name, per decode step
        return {k: buffers[f"packed_{k}"] for k in self._keys}

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized [out, in] weight (the bias dtype, else float32) on the layer's device,
        for model code that reads `layer.weight`; each read dequantizes (the forward never reads it)."""
        kernels, packed = backend_module(self.backend), self.packed()
        if "weight" in packed:  # the torch reference keeps the dequantized weight
            w = packed["weight"]
        elif hasattr(kernels, "int4_dequant_packed"):
            w = kernels.int4_dequant_packed(packed, self.group_size, self.out_features, self.packed_k)
        else:  # the kernel applied to the identity is the weight it multiplies by
            eye = torch.eye(self.packed_k, dtype=torch.float32, device=next(iter(packed.values())).device)
            w = kernels.int4_matmul_packed(eye, packed, self.group_size, self.out_features, self.packed_k).t()
        return w[:, : self.in_features].to(self.bias.dtype if self.bias is not None else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_k != self.in_features:
            x = F.pad(x, (0, self.packed_k - self.in_features))
        kernels = backend_module(self.backend)
        bf16_rows = getattr(kernels, "PREFILL_BF16_ROWS", None)  # see cpu.py
        if bf16_rows is not None and x.dtype == torch.float32 and x.numel() > bf16_rows * x.shape[-1]:
            y = kernels.int4_matmul_packed(x.bfloat16(), self.packed(), self.group_size, self.out_features,
                                           self.packed_k).float()
        else:
            y = kernels.int4_matmul_packed(x, self.packed(), self.group_size, self.out_features, self.packed_k)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def optistack_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size,
                "packed_k": self.packed_k, "backend": self.backend, "bias": self.bias is not None,
                "layout": getattr(backend_module(self.backend), "INT4_LAYOUT", None),
                "buffers": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in self.packed().items()}}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "FusedInt4Linear":
        """Refuses a weight packed in a layout this version's kernels would misread (see cpu.INT4_LAYOUT)."""
        readable = getattr(backend_module(spec["backend"]), "int4_layout_readable", None)
        if readable is not None and not readable(spec.get("layout"), spec["packed_k"]):
            raise ValueError(f"FusedInt4Linear: the {spec['backend']} int4 weight was saved in layout "
                             f"{spec.get('layout')!r}, which this version does not read; re-run the pipeline to re-pack it")
        return cls(spec["in_features"], spec["out_features"], spec["group_size"], spec["packed_k"], spec["backend"],
                   {k: tuple(v) for k, v in spec["buffers"].items()}, spec["bias"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"backend={self.backend}")


class FusedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one projection (`gate_up`, gate rows first):
    one matmul instead of two, then the fused SwiGLU kernel on the two halves (strided views)."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, backend: str) -> None:
        super().__init__()
        self.gate_up, self.down_proj, self.backend = gate_up, down, backend
        backend_module(backend)  # fail early on an unknown name; looked up per call (deepcopy-safe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        inter = h.shape[-1] // 2
        return self.down_proj(backend_module(self.backend).swiglu(h[..., :inter], h[..., inter:]))

    def optistack_spec(self) -> dict:
        return {"backend": self.backend, "gate_up": _linear_spec(self.gate_up), "down": _linear_spec(self.down_proj)}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "FusedGatedMLP":
        return cls(_linear_from_spec(spec["gate_up"]), _linear_from_spec(spec["down"]), spec["backend"])


def _linear_spec(m: nn.Module) -> dict:
    from .engine_linear import EngineInt4Linear

    if isinstance(m, FusedInt4Linear):
        return {"kind": "int4", **m.optistack_spec()}
    if isinstance(m, EngineInt4Linear):  # decode-engine shared the engine's weights with the model
        return {"kind": "engine-int4", **m.optistack_spec()}
    return {"kind": "linear", "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "dtype": str(m.weight.dtype).removeprefix("torch.")}


def _linear_from_spec(spec: dict) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "int4":
        return FusedInt4Linear.from_optistack_spec(spec)
    if kind == "engine-int4":
        from .engine_linear import EngineInt4Linear

        return EngineInt4Linear.from_optistack_spec(spec)
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=getattr(torch, spec["dtype"]))


_BACKEND = choice(*BACKEND_MODULES)
_FLOAT_DTYPE = choice("float32", "float16", "bfloat16", "float64")


def _buffers(v: Any) -> str | None:
    if type(v) is not dict or not 0 < len(v) <= 16:
        return f"must be an object of 1..16 packed buffers, got {short(v)}"
    for key, entry in v.items():
        if type(key) is not str or not key.isidentifier():
            return f"buffer name {short(key)} must be an identifier"
        if type(entry) is not list or len(entry) != 2 or shape_check(entry[0]) or dtype_name(entry[1]):
            return f"buffer {key!r} must be [shape, dtype name], got {short(entry)}"
    return None


_FUSED_INT4 = {**LINEAR_FIELDS, "group_size": integer(1, 1 << 20), "packed_k": FEATURES, "backend": _BACKEND,
               "layout": optional(text(128)), "buffers": _buffers}
_FUSED_LINEAR = {**LINEAR_FIELDS, "dtype": _FLOAT_DTYPE}


def _fused_projection(v: Any) -> str | None:
    kind = v.get("kind") if type(v) is dict else None
    if kind == "int4":
        return record({"kind": choice("int4"), **_FUSED_INT4}, required_keys(_FUSED_INT4, ("layout",)))(v)
    if kind == "linear":
        return record({"kind": choice("linear"), **_FUSED_LINEAR}, required_keys(_FUSED_LINEAR))(v)
    if kind == "engine-int4":
        from .engine_linear import ENGINE_INT4_FIELDS

        return record({"kind": choice("engine-int4"), **ENGINE_INT4_FIELDS}, required_keys(ENGINE_INT4_FIELDS))(v)
    return f"must be a projection spec with kind 'int4', 'engine-int4' or 'linear', got {short(v)}"


register_module(FusedRMSNorm, {"hidden_size": FEATURES, "eps": number(0.0, 1.0), "backend": _BACKEND,
                               "dtype": _FLOAT_DTYPE})
register_module(FusedInt4Linear, _FUSED_INT4, optional_keys=("layout",))
register_module(FusedGatedMLP, {"backend": _BACKEND, "gate_up": _fused_projection, "down": _fused_projection})
