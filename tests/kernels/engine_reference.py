"""A plain-torch forward with the engine's numerics (int8 activations per 64 channels for the int4
projections, int16 for the int8 head), from the engine's own packed weights, over rows of (token, slot,
position): the reference the C++ engine (csrc/cpu/llama_decode.cpp) is tested against."""
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


def dequant(p) -> torch.Tensor:
    n = p.q.shape[0]
    packed = p.q.reshape(n, -1, 32)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(n, -1).float()  # unit = lo 32 then hi 32
    return (codes.reshape(n, -1, 64) * p.s[..., None] + p.zc[..., None]).reshape(n, -1)


def linear(x: torch.Tensor, p, qmax: int = 127) -> torch.Tensor:
    y = q8(x, qmax) @ dequant(p).T
    return y + p.bias if p.bias.numel() else y


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(v: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    h = v.shape[-1] // 2
    a, b = v[..., :h], v[..., h:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def forward(weights, tokens, slots, positions, k_cache, v_cache, cos, sin, act_bits: int = 8) -> torch.Tensor:
    """Logits [N, V] of every row; writes each row's key and value at its slot and position of the caches
    [L, S, Hkv, T, D] like the engine, and attends each row over its slot's positions 0..its own."""
    qmax = 127 if act_bits == 8 else 32767
    d, eps = weights.dims, weights.eps
    hq, hkv, hd = d.heads, d.kv_heads, d.head_dim
    tokens, slots, positions = (torch.as_tensor(t).long() for t in (tokens, slots, positions))
    x = weights.embed[tokens].float()
    n = x.shape[0]
    c, s = cos[positions][:, None], sin[positions][:, None]
    for layer, blk in enumerate(weights.blocks):
        qkv = linear(rms(x, blk.norm1, eps), blk.qkv, qmax)
        q = rope(qkv[:, : hq * hd].reshape(n, hq, hd), c, s)
        k = rope(qkv[:, hq * hd: (hq + hkv) * hd].reshape(n, hkv, hd), c, s)
        v = qkv[:, (hq + hkv) * hd:].reshape(n, hkv, hd)
        for i in range(n):
            k_cache[layer, slots[i], :, positions[i]] = k[i]
            v_cache[layer, slots[i], :, positions[i]] = v[i]
        out = torch.empty(n, hq, hd)
        for i in range(n):
            t = int(positions[i]) + 1
            keys = k_cache[layer, slots[i], :, :t].float().repeat_interleave(hq // hkv, dim=0)
            vals = v_cache[layer, slots[i], :, :t].float().repeat_interleave(hq // hkv, dim=0)
            att = torch.softmax((keys @ q[i][..., None])[..., 0] / hd ** 0.5, dim=-1)
            out[i] = (att[:, None, :] @ vals)[:, 0]
        x = x + linear(out.reshape(n, hq * hd), blk.o, qmax)
        gu = linear(rms(x, blk.norm2, eps), blk.gate_up, qmax)
        inter = gu.shape[-1] // 2
        x = x + linear(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], blk.down, qmax)
    h = q16(rms(x, weights.final_norm, eps))
    return h @ (weights.head_q.float() * weights.head_s[:, None]).T
