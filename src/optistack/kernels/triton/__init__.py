"""Triton backend ("triton") of the kernel contract in `..reference`: fused RMSNorm (+ residual),
SwiGLU, int4 weight-only matmul (GEMV for decode, tiled GEMM for prefill), FP8 E4M3 scaled matmul.

Importing this package imports neither triton nor the kernels: `available()` stays cheap, and the
kernel modules are imported on first call. Triton decides at import time of a kernel module
(`@triton.jit`) whether kernels are compiled for the GPU or run by its interpreter: with
`TRITON_INTERPRET=1` in the environment before the first call, the same functions accept CPU
tensors (roughly 1000x slower than torch: for tests at tiny shapes only). `interpreted()` says which
mode the loaded kernels are in.
"""
from __future__ import annotations

import importlib.util
import os

from ...core.requirements import Availability

BACKEND = "triton"
NO_GPU_REASON = "no CUDA GPU (the Triton interpreter is for tests only)"


def available() -> Availability:
    """ok on a CUDA (or ROCm) device with triton installed; never builds or imports anything."""
    if importlib.util.find_spec("triton") is None:
        return Availability.no("package triton not installed; pip install 'optistack[triton]'")
    import torch

    if not torch.cuda.is_available():
        return Availability.no(NO_GPU_REASON)
    if torch.version.hip is None and torch.cuda.get_device_capability() < (7, 0):
        cap = torch.cuda.get_device_capability()
        return Availability.no(f"Triton needs compute capability >= 7.0; this GPU is {cap[0]}.{cap[1]}")
    return Availability.yes()


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET=1 is set, i.e. kernels imported from now on run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreted() -> bool:
    """Whether the (possibly already imported) kernels run under the interpreter."""
    from . import _launch

    return _launch.INTERPRETED


def ensure_built() -> None:
    """Import triton and the kernel modules now (each kernel still compiles per shape on first call)."""
    check = available()
    if not check.ok and not interpreter_requested():
        raise RuntimeError(f"optistack triton kernels unavailable: {check.reason}")
    from . import activation, fp8, int4, norm  # noqa: F401


def int4_supports(group_size: int) -> bool:
    """Whether `int4_prepack` takes this group size (powers of two >= 32: one tl.dot K-tile per half group)."""
    return group_size >= 32 and group_size & (group_size - 1) == 0


def rms_norm(x, weight, eps: float, residual=None):
    """See `reference.rms_norm`: returns y, or (y, x + residual) when `residual` is given."""
    from .norm import rms_norm as impl

    return impl(x, weight, eps, residual)


def swiglu(gate, up):
    """See `reference.swiglu`: silu(gate) * up, float32 math."""
    from .activation import swiglu as impl

    return impl(gate, up)


def int4_prepack(codes, scale, zero, group_size: int) -> dict:
    """Codes [N, K] -> {"qweight": uint8 [N, K/2], "scale"/"zero": float32 [K/g, N]} (see int4.py)."""
    from .int4 import int4_prepack as impl

    return impl(codes, scale, zero, group_size)


def int4_matmul_packed(x, packed: dict, group_size: int, n: int, k: int):
    """y = x @ w.T for a weight packed by `int4_prepack`; float32 accumulation, x.dtype out."""
    from .int4 import int4_matmul_packed as impl

    return impl(x, packed, group_size, n, k)


def int4_matmul(x, codes, scale, zero, group_size: int):
    """See `reference.int4_matmul`. Packs the weight on every call: pack once with `int4_prepack`
    and call `int4_matmul_packed` in a model."""
    return int4_matmul_packed(x, int4_prepack(codes, scale, zero, group_size), group_size, *codes.shape)


def fp8_scaled_matmul(x_fp8, w_fp8, x_scale, w_scale, out_dtype=None):
    """See `reference.fp8_scaled_matmul`: per-token x_scale [M, 1], per-channel w_scale [1, N]."""
    import torch

    from .fp8 import fp8_scaled_matmul as impl

    return impl(x_fp8, w_fp8, x_scale, w_scale, torch.bfloat16 if out_dtype is None else out_dtype)


__all__ = ["available", "ensure_built", "int4_supports", "interpreted", "interpreter_requested", "rms_norm", "swiglu",
           "int4_prepack", "int4_matmul_packed", "int4_matmul", "fp8_scaled_matmul", "BACKEND", "NO_GPU_REASON"]
