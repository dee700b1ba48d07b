"""Fused SwiGLU: silu(gate) * up in one pass over memory, float32 math, gate's dtype out.

Rows may be strided (last dim contiguous): `swiglu(h[..., :i], h[..., i:])` on a fused gate/up
projection reads both halves in place instead of copying them first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, on_device

_BLOCK = 1024


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n_cols, g_stride, u_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, cols] with unit column stride: a view when the layout allows, else a contiguous copy."""
    cols = t.shape[-1] if t.dim() else 1
    if t.dim() and t.stride(-1) == 1:
        try:
            return t.view(-1, cols)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, cols)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    device = check_tensors("swiglu", gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError("triton swiglu: gate and up must match in shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    g, u = _as_rows(gate), _as_rows(up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=device)
    rows, cols = g.shape
    if rows and cols:
        with on_device(device):
            _swiglu_kernel[(rows, triton.cdiv(cols, _BLOCK))](g, u, y, cols, g.stride(0), u.stride(0),
                                                              BLOCK=_BLOCK, num_warps=4)
    return y
