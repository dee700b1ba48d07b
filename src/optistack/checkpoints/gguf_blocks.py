"""Our quantized layers as GGUF (ggml) blocks, written by hand so the grid is kept, not re-rounded.

ggml block layouts (32 weights a block, along a row; the row length must be a multiple of 32):

- `Q4_0`: fp16 d, 16 bytes of nibbles; w = d * (q - 8). Weight j of the block is the low nibble of
  byte j for j < 16, the high nibble of byte j - 16 otherwise.
- `Q4_1`: fp16 d, fp16 m, the same 16 bytes; w = d * q + m.
- `Q8_0`: fp16 d, 32 int8; w = d * q.

Our int4 grid (layers/int4_grid.py) is w = (q - 8) * scale + zero per group of 32/64/128/... inputs:
an asymmetric group is Q4_1 with d = scale, m = zero - 8 * scale, repeated for each 32-block of the
group, exact up to the fp16 rounding of d and m; a symmetric one (zero 0) is Q4_0 with d = scale.
Our int8 (one scale per output row) is Q8_0 with the row's scale in every block (fp16-rounded).
K-quants (Q4_K: 6-bit sub-block scales and mins under one fp16 scale per 256) cannot hold our
per-group float scales without rounding them again, so they are never chosen.
"""
from __future__ import annotations

import numpy as np
import torch

from .compressed_tensors import CheckpointError

BLOCK = 32
FP16_MAX = 65504.0


def layout_error(name: str, in_features: int, group_size: int | None = None) -> str | None:
    """Why this layer's grid has no ggml block form, or None when it maps."""
    if in_features % BLOCK:
        return (f"{name}: in_features {in_features} is not a multiple of {BLOCK}, the ggml block length "
                "(llama.cpp stores rows in whole blocks)")
    if group_size is not None and group_size % BLOCK:
        return (f"{name}: int4 group_size {group_size} is not a multiple of {BLOCK}: one Q4_0/Q4_1 block of "
                f"{BLOCK} weights has one scale, our groups would need {BLOCK // group_size}; quantize with "
                "group_size 32, 64 or 128")
    return None


def _fp16(name: str, what: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > FP16_MAX:
        raise CheckpointError(f"{name}: a {what} is outside fp16's range (|x| <= {FP16_MAX}), which GGUF blocks "
                              "store in fp16; this layer cannot be written as GGUF")
    return values.astype(np.float16)


def _nibble_bytes(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes 0..15 -> [..., 16] bytes in ggml's order (first half low, second half high)."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def int4_blocks(name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                in_features: int) -> tuple[str, np.ndarray]:
    """("Q4_0" | "Q4_1", uint8 [N, bytes per row]) of an int4 layer's codes [N, K padded] and its
    per-group scale/zero [N, groups]; the padding columns past `in_features` are dropped."""
    why = layout_error(name, in_features, group_size)
    if why:
        raise CheckpointError(why)
    n = codes.shape[0]
    nb = in_features // BLOCK
    reps = group_size // BLOCK
    q = codes[:, :in_features].to(torch.uint8).numpy().reshape(n, nb, BLOCK)
    s = scale.float().repeat_interleave(reps, dim=1)[:, :nb].numpy()
    z = zero.float().repeat_interleave(reps, dim=1)[:, :nb].numpy()
    qs = _nibble_bytes(q)
    d = _fp16(name, "scale", s).reshape(n, nb, 1).view(np.uint8)
    if not z.any():
        return "Q4_0", np.concatenate([d, qs], axis=-1).reshape(n, -1)
    m = _fp16(name, "block minimum (zero - 8 * scale)", z - 8.0 * s).reshape(n, nb, 1).view(np.uint8)
    return "Q4_1", np.concatenate([d, m, qs], axis=-1).reshape(n, -1)


def int8_blocks(name: str, qweight: torch.Tensor, scale: torch.Tensor) -> tuple[str, np.ndarray]:
    """("Q8_0", uint8 [N, bytes per row]) of int8 weights [N, K] with one scale per output row."""
    n, k = qweight.shape
    why = layout_error(name, k)
    if why:
        raise CheckpointError(why)
    nb = k // BLOCK
    d = _fp16(name, "scale", np.repeat(scale.float().numpy()[:, None], nb, axis=1)).reshape(n, nb, 1).view(np.uint8)
    qs = qweight.to(torch.int8).numpy().reshape(n, nb, BLOCK).view(np.uint8)
    return "Q8_0", np.concatenate([d, qs], axis=-1).reshape(n, -1)


def float_tensor(name: str, w: torch.Tensor, dtype: str) -> tuple[str, np.ndarray]:
    """("F32" | "F16", array) of a float tensor; F16 only where the values fit its range."""
    a = w.detach().float().cpu().numpy()
    if dtype == "F16" and a.ndim > 1:
        return "F16", _fp16(name, "weight", a)
    return "F32", a.astype(np.float32)


def dequantize_blocks(kind: str, data: np.ndarray, in_features: int) -> np.ndarray:
    """Our own reading of the blocks back to float32 [N, in_features] (the per-layer error we report;
    the tests check it and the writer against gguf's independent dequantizer)."""
    n = data.shape[0]
    if kind in ("F32", "F16"):
        return data.astype(np.float32)
    nb = in_features // BLOCK
    b = data.reshape(n, nb, -1)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    if kind == "Q8_0":
        return (d * b[..., 2:].copy().view(np.int8).astype(np.float32)).reshape(n, -1)
    raw = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
    q = np.concatenate([raw & 0xF, raw >> 4], axis=-1).astype(np.float32)
    if kind == "Q4_0":
        return (d * (q - 8.0)).reshape(n, -1)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, -1)


def rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants for q_proj/k_proj (convert_hf_to_gguf permutes them for its RoPE):
    within each head, HF's [first half, second half] rows interleaved pairwise."""
    if n_rows % (2 * n_head):
        raise CheckpointError(f"{n_rows} rows do not split into {n_head} heads of an even size")
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)
