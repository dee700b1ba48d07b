"""`fuse-kernels`: swap Llama-style RMSNorm, gated MLPs and int4 / FP8 linears for custom kernels.

Patterns (option `patterns`, any of rmsnorm,swiglu,int4,fp8):
- rmsnorm: modules whose class name ends in "RMSNorm" with a 1-D `weight` and `variance_epsilon`
  (transformers' Llama/Mistral/Qwen2 norms) -> `FusedRMSNorm`.
- swiglu: modules with `gate_proj`, `up_proj`, `down_proj` and a SiLU `act_fn` (LlamaMLP) whose gate and
  up projections are the same kind (both float nn.Linear of one dtype, or both Int4Linear with one
  group size) -> `FusedGatedMLP`: gate and up concatenated into one projection, then fused SwiGLU.
- int4: `optistack.layers.int4.Int4Linear` -> `FusedInt4Linear` in the backend's own layout.
- fp8: `Fp8Linear`s are left as they are on every backend here: the CPU has no fp8 kernel faster than
  the emulation, and the Triton fp8 matmul is not wired into a module yet.

`backend=auto` picks for the model's device: cpu -> cpu-cpp when a C++ compiler is available (else the
model is left unchanged); cuda -> triton, else cuda, else torch. `info` counts the replacements per
pattern and says which backends were not used and why.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.modeling import model_device as core_model_device
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability
from ...kernels.modules import BACKEND_MODULES, FusedGatedMLP, FusedInt4Linear, FusedRMSNorm, backend_module
from ...layers.fp8 import Fp8Linear
from ...layers.int4 import Int4Linear, int4_parts
from ..linears import set_module

PATTERNS = ("rmsnorm", "swiglu", "int4", "fp8")
BACKENDS = ("auto", "cpu-cpp", "triton", "cuda", "torch")
DEVICE_PREFERENCE = {"cpu": ("cpu-cpp",), "cuda": ("triton", "cuda", "torch")}


@dataclasses.dataclass(frozen=True)
class FuseKernelsConfig(PassConfig):
    patterns: str = "rmsnorm,swiglu,int4,fp8"
    backend: str = "auto"

    def __post_init__(self) -> None:
        chosen = self.pattern_set()
        bad = sorted(chosen - set(PATTERNS))
        check(not bad and chosen, f"fuse-kernels: option 'patterns' takes a comma list of {', '.join(PATTERNS)}; "
                                  f"got {self.patterns!r}")
        check(self.backend in BACKENDS, f"fuse-kernels: option 'backend' must be one of {', '.join(BACKENDS)}; "
                                        f"got {self.backend!r}")

    def pattern_set(self) -> set[str]:
        return {p.strip() for p in self.patterns.split(",") if p.strip()}


def backend_availability(name: str) -> Availability:
    try:
        return backend_module(name).available()
    except ImportError as exc:
        return Availability.no(f"its module is not installed ({exc})")


def choose_backend(device: torch.device, wanted: str) -> tuple[str | None, dict[str, str]]:
    """(backend or None, {backend: why not used}) for a model on `device`."""
    candidates = DEVICE_PREFERENCE.get(device.type, ()) if wanted == "auto" else (wanted,)
    why_not: dict[str, str] = {}
    for name in candidates:
        avail = backend_availability(name)
        if avail:
            build = getattr(backend_module(name), "ensure_built", None)
            if build is not None:  # building is the real test of the compiler: do it now, not mid-forward
                try:
                    build()
                except RuntimeError as exc:
                    why_not[name] = str(exc)
                    continue
            if wanted == "auto":
                for other in BACKEND_MODULES:
                    if other not in candidates and other != "torch":
                        why_not.setdefault(other, f"not for {device.type} models")
            return name, why_not
        why_not[name] = avail.reason or "unavailable"
    return None, why_not


def model_device(model: nn.Module) -> torch.device:
    """The model's device (core.modeling's one answer), the CPU for a model without tensors."""
    return core_model_device(model) or torch.device("cpu")


def is_rmsnorm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.ndim == 1
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU") or act is torch.nn.functional.silu


def gated_mlp_kind(m: nn.Module) -> str | None:
    """"float" / "int4" when `m` is a SiLU-gated MLP whose gate and up can be concatenated, else None."""
    gate, up, down = (getattr(m, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None or not _is_silu(getattr(m, "act_fn", None)):
        return None
    if type(gate) is nn.Linear and type(up) is nn.Linear and gate.weight.dtype == up.weight.dtype \
            and gate.in_features == up.in_features and gate.out_features == up.out_features:
        return "float"
    if isinstance(gate, Int4Linear) and isinstance(up, Int4Linear) and gate.group_size == up.group_size \
            and gate.in_features == up.in_features and gate.out_features == up.out_features:
        return "int4"
    return None


def int4_supported(lin: Any, backend: str) -> bool:
    """Whether `backend` has an int4 kernel for this layer's group size."""
    supports = getattr(backend_module(backend), "int4_supports", None)
    return supports is None or supports(lin.group_size)


def fused_int4(lin: Any, backend: str) -> FusedInt4Linear:
    codes, scale, zero = int4_parts(lin)
    return FusedInt4Linear.from_parts(codes, scale, zero, lin.group_size, lin.in_features, lin.bias, backend)


def fused_mlp(m: nn.Module, kind: str, backend: str) -> FusedGatedMLP:
    gate, up = m.gate_proj, m.up_proj
    if kind == "float":
        gate_up = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None, device="meta")
        gate_up.weight = nn.Parameter(torch.cat([gate.weight.detach(), up.weight.detach()]), requires_grad=False)
        if gate.bias is not None:
            gate_up.bias = nn.Parameter(torch.cat([gate.bias.detach(), up.bias.detach()]), requires_grad=False)
    else:
        (cg, sg, zg), (cu, su, zu) = int4_parts(gate), int4_parts(up)
        bias = None if gate.bias is None and up.bias is None else torch.cat([
            gate.bias if gate.bias is not None else torch.zeros(gate.out_features),
            up.bias if up.bias is not None else torch.zeros(up.out_features)])
        gate_up = FusedInt4Linear.from_parts(torch.cat([cg, cu]), torch.cat([sg, su]), torch.cat([zg, zu]),
                                             gate.group_size, gate.in_features, bias, backend)
    down = m.down_proj
    if isinstance(down, Int4Linear) and int4_supported(down, backend):
        down = fused_int4(down, backend)
    return FusedGatedMLP(gate_up, down, backend)


class FuseKernelsPass(ConfiguredPass):
    name = "fuse-kernels"
    Config = FuseKernelsConfig
    takes = frozenset({MODULE})
    lossy = False
    copy_on_write = True  # swaps in new layers, never writes into its input's tensors

    def requirements(self) -> Availability:
        if self.config.backend in ("auto", "torch"):
            return Availability.yes()
        return backend_availability(self.config.backend)

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        if not isinstance(model, nn.Module):
            raise PassApplyError(f"fuse-kernels: expected a torch.nn.Module, got {type(model).__name__}")
        patterns = self.config.pattern_set()
        found = self._find(model, patterns)
        if not any(found.values()):
            return PassResult(model, modified=False, info={"reason": (
                "nothing to change: nothing to fuse: the model has no *RMSNorm module with weight and variance_epsilon, "
                "no gated MLP (gate_proj/up_proj/down_proj + SiLU), no Int4Linear and no Fp8Linear among the "
                f"patterns {sorted(patterns)}")})
        device = model_device(model)
        backend, why_not = choose_backend(device, self.config.backend)
        info: dict[str, Any] = {"backend": backend or "none", "device": device.type}
        info.update({f"found_{p}": len(v) for p, v in found.items()})
        if why_not:
            info["backends_not_used"] = "; ".join(f"{k}: {v}" for k, v in why_not.items())
        if found["fp8"]:
            info["fp8_left"] = (f"{len(found['fp8'])} Fp8Linear left as they are: no fp8 kernel here beats the "
                                "emulation on CPU, and no fp8 module kernel is wired for GPUs yet")
        if backend is None:
            info["reason"] = f"no kernel backend usable for a {device.type} model; the model is unchanged"
            return PassResult(model, modified=False, info=info)
        replacements = self._replacements(found, backend)  # build all first: never leave a half-fused model
        for name, new in replacements.items():
            set_module(model, name, new)
        for p in ("rmsnorm", "swiglu", "int4"):
            info[f"replaced_{p}"] = sum(1 for n in found[p] if n in replacements)
        left = len(found["int4"]) - info["replaced_int4"]
        if left:
            info["int4_left"] = f"{left} Int4Linear left: {backend} has no int4 kernel for their group size"
        return PassResult(model, modified=bool(replacements), info=info)

    @staticmethod
    def _find(model: nn.Module, patterns: set[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {p: {} for p in PATTERNS}
        inside_mlp: set[str] = set()
        for name, m in model.named_modules():
            if any(name.startswith(p + ".") for p in inside_mlp):
                continue
            if "rmsnorm" in patterns and is_rmsnorm(m):
                found["rmsnorm"][name] = m
            elif "swiglu" in patterns and gated_mlp_kind(m) in ({"float", "int4"} if "int4" in patterns else {"float"}):
                found["swiglu"][name] = m
                inside_mlp.add(name)  # its int4 projections are fused as part of it
            elif "int4" in patterns and isinstance(m, Int4Linear):
                found["int4"][name] = m
            elif "fp8" in patterns and isinstance(m, Fp8Linear):
                found["fp8"][name] = m
        return found

    @staticmethod
    def _replacements(found: dict[str, dict[str, Any]], backend: str) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for name, m in found["rmsnorm"].items():
            out[name] = FusedRMSNorm.from_module(m, backend)
        for name, m in found["swiglu"].items():
            kind = gated_mlp_kind(m)
            if kind == "float" or int4_supported(m.gate_proj, backend):
                out[name] = fused_mlp(m, kind, backend)
        for name, m in found["int4"].items():
            if int4_supported(m, backend):
                out[name] = fused_int4(m, backend)
        return out
