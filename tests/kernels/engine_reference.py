"""A plain-torch decode step with the engine's numerics (int8 activations per 64 channels for the int4
projections, int16 for the int8 head), from the engine's own packed weights: the reference the C++
engine (csrc/cpu/llama_decode.cpp) is tested against."""
from __future__ import annotations

import torch


def q8(x: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """x with each 64-channel unit rounded to integer codes times amax / qmax (127: int8, 32767: int16)."""
    g = x.reshape(*x.shape[:-1], -1, 64)
    s = g.abs().amax(-1, keepdim=True) / qmax
    inv = torch.where(s > 0, qmax / g.abs().amax(-1, keepdim=True), torch.zeros_like(s))
    return (torch.round(g * inv) * s).reshape(x.shape)


def q16(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True) / 32767
    inv = torch.where(s > 0, 32767 / x.abs().amax(-1, keepdim=True), torch.zeros_like(s))
    return torch.round(x * inv) * s


def dequant(packed: torch.Tensor, s: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    p = packed.reshape(n, -1, 32)
    codes = torch.stack([p & 0x0F, p >> 4], dim=2).reshape(n, -1).float()  # [n, K]: unit = lo 32 then hi 32
    return (codes.reshape(n, -1, 64) * s[..., None] + zc[..., None]).reshape(n, -1)


def linear(x: torch.Tensor, w: list[torch.Tensor], qmax: int = 127) -> torch.Tensor:
    y = q8(x, qmax) @ dequant(*w[:3]).T
    return y + w[3] if w[3].numel() else y


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(v: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    h = v.shape[-1] // 2
    a, b = v[..., :h], v[..., h:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def step(weights, tokens: torch.Tensor, pos: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
         cos: torch.Tensor, sin: torch.Tensor, act_bits: int = 8) -> torch.Tensor:
    """Logits [B, V]; writes position `pos` of the caches [L, B, Hkv, T, D] like the engine."""
    qmax = 127 if act_bits == 8 else 32767
    d, t, eps = weights.dims, weights.tensors, weights.eps
    hq, hkv, hd = d["Hq"], d["Hkv"], d["D"]
    x = t[0][tokens].float()
    b = x.shape[0]
    for layer in range(d["L"]):
        lt = t[4 + 18 * layer: 4 + 18 * (layer + 1)]
        qkv = linear(rms(x, lt[0], eps), lt[2:6], qmax)
        q = rope(qkv[:, : hq * hd].reshape(b, hq, hd), cos[pos], sin[pos])
        k = rope(qkv[:, hq * hd: (hq + hkv) * hd].reshape(b, hkv, hd), cos[pos], sin[pos])
        k_cache[layer, :b, :, pos] = k
        v_cache[layer, :b, :, pos] = qkv[:, (hq + hkv) * hd:].reshape(b, hkv, hd)
        keys = k_cache[layer, :b, :, : pos + 1].float().repeat_interleave(hq // hkv, dim=1)
        vals = v_cache[layer, :b, :, : pos + 1].float().repeat_interleave(hq // hkv, dim=1)
        att = torch.softmax((keys @ q[..., None])[..., 0] / hd ** 0.5, dim=-1)
        x = x + linear((att[:, :, None, :] @ vals)[:, :, 0].reshape(b, hq * hd), lt[6:10], qmax)
        gu = linear(rms(x, lt[1], eps), lt[10:14], qmax)
        inter = gu.shape[-1] // 2
        x = x + linear(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], lt[14:18], qmax)
    h = q16(rms(x, t[1], eps))
    return h @ (t[2].float() * t[3][:, None]).T
