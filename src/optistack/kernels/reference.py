"""Plain-torch references for the custom kernels (the contract every backend is tested against).

Each function states the exact semantics the C++, Triton and CUDA versions must reproduce; they are
also the `torch` backend of the `fuse-kernels` pass. Low-precision inputs are computed in float32 and
cast back, as Llama's modules do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.int8 import int8_matmul_reference

_MID = 8  # int4 middle code: w = (q - 8) * scale + zero (optistack.layers.int4_grid's convention)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x * rsqrt(mean(x^2, -1) + eps) * weight, in float32, cast to x.dtype (Llama semantics).

    With `residual`: h = x + residual (in x.dtype, as a Llama decoder layer adds), returns
    (rms_norm(h, weight, eps), h)."""
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps), h
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 for low-precision inputs and cast back."""
    if gate.dtype in (torch.float32, torch.float64):
        return F.silu(gate) * up
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, K] weight from codes uint8 [N, K] (0..15) and scale/zero [N, K / group_size]."""
    n, k = codes.shape
    if k % group_size:
        raise ValueError(f"int4: K={k} is not a multiple of group_size={group_size}")
    q = codes.reshape(n, k // group_size, group_size).float() - _MID
    return (q * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """y = x @ w.T with w = (codes - 8) * scale + zero per group of consecutive input channels;
    float32 math, cast to x.dtype."""
    w = int4_dequantize(codes, scale, zero, group_size)
    return (x.float() @ w.t()).to(x.dtype)


def fp8_scaled_matmul(x_fp8: torch.Tensor, w_fp8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(x_fp8 * x_scale [M, 1]) @ (w_fp8 * w_scale.T [N, 1]).T, float32 math, cast to `out_dtype`."""
    x = x_fp8.float() * x_scale.float()
    w = w_fp8.float() * w_scale.float().reshape(-1, 1)
    return (x @ w.t()).to(out_dtype)


def int4_prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """The reference "layout" is the dequantized float32 weight (so `int4_matmul_packed` is one matmul)."""
    return {"weight": int4_dequantize(codes, scale, zero, group_size)}


def int4_matmul_packed(x: torch.Tensor, packed: dict, group_size: int, n: int, k: int) -> torch.Tensor:
    return (x.float() @ packed["weight"].t()).to(x.dtype)


def available():
    from ..core.requirements import Availability

    return Availability.yes()


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ w.T with w = qweight * scale[:, None] (int8 [N, K], one scale per output row): the int8
    layer's own reference (optistack.layers.int8)."""
    return int8_matmul_reference(x, qweight, scale)
