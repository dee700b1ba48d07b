"""FP8 (E4M3) scaled matmul: y = (x_fp8 * x_scale) @ (w_fp8 * w_scale.T).T with a per-token
activation scale x_scale [M, 1] and a per-output-channel weight scale w_scale [1, N].

Tiles of [BLOCK_M, BLOCK_N] accumulate the unscaled fp8 x fp8 products in float32, and the two
scales are applied once per output element at the end (they factor out of the sum over K). On
compute capability >= 8.9 (Ada, Hopper) `tl.dot` runs on fp8 directly. Older GPUs have no e4m3
type in Triton, so there (and under the interpreter) the kernel reads the raw bytes and widens them to
fp16 with bit operations: every e4m3 value times 2^-8 is exactly an fp16 value, products are exact in
the float32 accumulator, and the 2^16 comes back with the scales, so the result is the same.
Tile sizes are autotuned once per (M bucket, N, K) on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotuned, check_tensors, launch_config, on_device

E4M3 = torch.float8_e4m3fn
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# first entry: the interpreter's; on a GPU each is tried once per (M bucket, N, K)
_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4),
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)]


@triton.jit
def _e4m3_bits_to_f16(b):
    """uint8 e4m3fn bits -> the value / 256 as fp16, exactly. Placing e4m3's exponent and mantissa at
    fp16's low exponent bits scales every value, subnormals included, by 2^-8 (bias 15 vs 7)."""
    b16 = b.to(tl.uint16)
    return (((b16 & 0x80) << 8) | ((b16 & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def _fp8_mm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, y_ptr, M, N, K, M_BUCKET,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   NATIVE_FP8: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if NATIVE_FP8:
            acc = tl.dot(x, w, acc)
        else:
            acc = tl.dot(_e4m3_bits_to_f16(x), _e4m3_bits_to_f16(w), acc)
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    if not NATIVE_FP8:
        acc = acc * 65536.0  # both operands were value / 256
    y = acc * xs[:, None] * ws[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_fp8_mm = autotuned(_fp8_mm_kernel, _CONFIGS, key=["M_BUCKET", "N", "K"])


def _native_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_scaled_matmul(x_fp8: torch.Tensor, w_fp8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    device = check_tensors("fp8_scaled_matmul", x_fp8, w_fp8, x_scale, w_scale)
    if x_fp8.dtype != E4M3 or w_fp8.dtype != E4M3:
        raise ValueError(f"triton fp8_scaled_matmul: x and w must be {E4M3}, got {x_fp8.dtype} and {w_fp8.dtype}")
    if x_fp8.dim() != 2 or w_fp8.dim() != 2 or x_fp8.shape[1] != w_fp8.shape[1]:
        raise ValueError(f"triton fp8_scaled_matmul: expected x [M, K] and w [N, K], got "
                         f"{tuple(x_fp8.shape)} and {tuple(w_fp8.shape)}")
    (m, k), n = x_fp8.shape, w_fp8.shape[0]
    if x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"triton fp8_scaled_matmul: x_scale must be [{m}, 1] and w_scale [1, {n}], got "
                         f"{tuple(x_scale.shape)} and {tuple(w_scale.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"triton fp8_scaled_matmul: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    native = _native_fp8(device)
    x, w = x_fp8.contiguous(), w_fp8.contiguous()
    if not native:  # Triton has no e4m3 type below compute capability 8.9: pass the bits, widen in-kernel
        x, w = x.view(torch.uint8), w.view(torch.uint8)
    xs = x_scale.reshape(m).float().contiguous()
    ws = w_scale.reshape(n).float().contiguous()
    y = torch.empty(m, n, dtype=out_dtype, device=device)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        with on_device(device):
            _fp8_mm[grid](x, w, xs, ws, y, m, n, k, triton.next_power_of_2(m), NATIVE_FP8=native,
                          **launch_config(_CONFIGS))
    return y
