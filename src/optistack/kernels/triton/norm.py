"""Fused RMSNorm, optionally with the residual add of a Llama decoder layer fused in.

One program per row: the row is read once into registers (BLOCK >= hidden size), the sum of squares
is reduced in float32, and y = x * rsqrt(mean + eps) * weight is written in x's dtype. With a
residual, h = x + residual is rounded to x's dtype first (as the eager layer does), stored, and
normalized from the rounded value, so both outputs match `reference.rms_norm` bit for bit in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, on_device, rows

_MAX_BLOCK = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    inv = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (xf * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    device = check_tensors("rms_norm", x, weight, *(() if residual is None else (residual,)))
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"triton rms_norm: weight must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("triton rms_norm: residual must match x in shape and dtype, got "
                         f"{tuple(residual.shape)} {residual.dtype} vs {tuple(x.shape)} {x.dtype}")
    block = triton.next_power_of_2(n)
    if block > _MAX_BLOCK:
        raise ValueError(f"triton rms_norm: hidden size {n} is above the supported {_MAX_BLOCK}")
    x2 = rows(x, "rms_norm")
    y = torch.empty_like(x2)
    r2 = rows(residual, "rms_norm") if residual is not None else x2
    h = torch.empty_like(x2) if residual is not None else y
    if x2.shape[0]:
        with on_device(device):
            _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight.contiguous(), y, h, n, float(eps),
                                             HAS_RESIDUAL=residual is not None, BLOCK=block,
                                             num_warps=_num_warps(block))
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)
