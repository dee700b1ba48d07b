"""Int4 weight-only matmul in the contract's convention: w = (code - 8) * scale + zero per group of
`group_size` consecutive input channels; y = x @ w.T with float32 accumulation, x's dtype out.

Layout (`int4_prepack`): `qweight` uint8 [N, K/2]. Within each group, byte j holds the code of
channel j in its low nibble and of channel j + group_size/2 in its high nibble, so a kernel reads
the activations of a group as two contiguous halves instead of de-interleaving even/odd channels.
`scale`/`zero` are float32 [K/g, N] so a block of output channels reads them contiguously.

The kernels never build the float weight. Per group and output channel they use
    sum_k x_k * w_k = scale * sum_k x_k * (code_k - 8) + zero * sum_k x_k,
where (code - 8) is an exact small integer in any float type:
- GEMV (M < 16, decode): one program per (row, block of outputs); elementwise partial sums over a
  [BLOCK_N, group/2] tile, reduced once at the end.
- GEMM (prefill): tiles of [BLOCK_M, BLOCK_N], `tl.dot` on (x half-group, code half-group) in x's
  dtype (exact products, fp32 accumulation; IEEE fp32 for fp32 inputs, never TF32).
On a GPU both autotune their tile sizes once per shape (first call); the interpreter uses the first config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, autotuned, check_tensors, launch_config, on_device, rows

_GEMM_MIN_M = 16
# first entry: the interpreter's (and a sane GPU default); the rest are tried once per shape on a GPU
_GEMV_CONFIGS = [dict(BLOCK_N=32, num_warps=4), dict(BLOCK_N=16, num_warps=2), dict(BLOCK_N=32, num_warps=2),
                 dict(BLOCK_N=64, num_warps=4), dict(BLOCK_N=128, num_warps=4), dict(BLOCK_N=128, num_warps=8)]
_GEMM_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=64, num_warps=4), dict(BLOCK_M=32, BLOCK_N=64, num_warps=4),
                 dict(BLOCK_M=64, BLOCK_N=64, num_warps=4), dict(BLOCK_M=64, BLOCK_N=128, num_warps=4),
                 dict(BLOCK_M=128, BLOCK_N=128, num_warps=8), dict(BLOCK_M=128, BLOCK_N=64, num_warps=4)]


def _check_group_size(group_size: int, k: int) -> None:
    if not (group_size >= 32 and group_size & (group_size - 1) == 0):
        raise ValueError(f"triton int4: group_size must be a power of two >= 32, got {group_size}")
    if k % group_size:
        raise ValueError(f"triton int4: K={k} is not a multiple of group_size={group_size}")


def int4_prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> dict:
    """Codes uint8 [N, K] (0..15), scale/zero [N, K/g] -> this backend's layout (plain torch ops)."""
    n, k = codes.shape
    _check_group_size(group_size, k)
    if scale.shape != (n, k // group_size) or zero.shape != scale.shape:
        raise ValueError(f"triton int4: scale and zero must be [{n}, {k // group_size}], "
                         f"got {tuple(scale.shape)} and {tuple(zero.shape)}")
    c = codes.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    qweight = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return {"qweight": qweight, "scale": scale.float().t().contiguous(), "zero": zero.float().t().contiguous()}


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, K, n_groups,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    half = tl.arange(0, GROUP // 2)
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + half[None, :]
    # elementwise partial sums, reduced across the tile once at the end (no reduction per group)
    acc = tl.zeros([BLOCK_N, GROUP // 2], dtype=tl.float32)
    for g in range(0, n_groups):
        xg = x_ptr + m * K + g * GROUP
        x_lo = tl.load(xg + half).to(tl.float32)
        x_hi = tl.load(xg + GROUP // 2 + half).to(tl.float32)
        q = tl.load(q_rows + g * (GROUP // 2), mask=mask_n[:, None], other=0)
        w_lo = (q & 0xF).to(tl.float32) - 8.0
        w_hi = (q >> 4).to(tl.float32) - 8.0
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        acc += s[:, None] * (w_lo * x_lo[None, :] + w_hi * x_hi[None, :]) + z[:, None] * (x_lo + x_hi)[None, :]
    tl.store(y_ptr + m * N + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, n_groups, M_BUCKET,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    half = tl.arange(0, GROUP // 2)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K + half[None, :]
    q_cols = q_ptr + offs_n.to(tl.int64)[None, :] * (K // 2) + half[:, None]  # [GROUP/2, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, n_groups):
        x_lo = tl.load(x_rows + g * GROUP, mask=mask_m[:, None], other=0.0)
        x_hi = tl.load(x_rows + g * GROUP + GROUP // 2, mask=mask_m[:, None], other=0.0)
        if UPCAST:  # the interpreter's dot multiplies bf16 bit patterns as integers: use fp32 there
            x_lo = x_lo.to(tl.float32)
            x_hi = x_hi.to(tl.float32)
        q = tl.load(q_cols + g * (GROUP // 2), mask=mask_n[None, :], other=0)
        # via float32: exact for -8..7, and the interpreter mis-casts integers straight to bf16
        w_lo = ((q & 0xF).to(tl.float32) - 8.0).to(x_lo.dtype)
        w_hi = ((q >> 4).to(tl.float32) - 8.0).to(x_lo.dtype)
        if IEEE:
            dot = tl.dot(x_lo, w_lo, input_precision="ieee") + tl.dot(x_hi, w_hi, input_precision="ieee")
        else:
            dot = tl.dot(x_lo, w_lo) + tl.dot(x_hi, w_hi)
        x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        acc += s[None, :] * dot + z[None, :] * x_sum[:, None]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_int4_gemv = autotuned(_int4_gemv_kernel, _GEMV_CONFIGS, key=["N", "K", "GROUP"])
_int4_gemm = autotuned(_int4_gemm_kernel, _GEMM_CONFIGS, key=["N", "K", "GROUP", "M_BUCKET"])


def int4_matmul_packed(x: torch.Tensor, packed: dict, group_size: int, n: int, k: int) -> torch.Tensor:
    qweight, scale, zero = packed["qweight"], packed["scale"], packed["zero"]
    device = check_tensors("int4_matmul", x, qweight, scale, zero)
    _check_group_size(group_size, k)
    if x.shape[-1] != k or qweight.shape != (n, k // 2) or scale.shape != (k // group_size, n):
        raise ValueError(f"triton int4_matmul: expected x [..., {k}], qweight [{n}, {k // 2}], scale "
                         f"[{k // group_size}, {n}]; got {tuple(x.shape)}, {tuple(qweight.shape)}, "
                         f"{tuple(scale.shape)} (pack with int4_prepack)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"triton int4_matmul: x must be float32, float16 or bfloat16, got {x.dtype}")
    x2 = rows(x, "int4_matmul")
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        with on_device(device):
            if m < _GEMM_MIN_M:
                grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
                _int4_gemv[grid](x2, qweight, scale, zero, y, n, k, k // group_size, GROUP=group_size,
                                 **launch_config(_GEMV_CONFIGS))
            else:
                upcast = INTERPRETED and x.dtype == torch.bfloat16
                grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
                _int4_gemm[grid](x2, qweight, scale, zero, y, m, n, k, k // group_size,
                                 M_BUCKET=triton.next_power_of_2(m), GROUP=group_size,
                                 IEEE=x.dtype == torch.float32 or upcast, UPCAST=upcast,
                                 **launch_config(_GEMM_CONFIGS))
    return y.view(*x.shape[:-1], n)
