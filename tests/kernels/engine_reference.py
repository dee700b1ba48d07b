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


def linear(x: torch.Tensor, p, qmax: int = 127, bf16_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's projection: int8 (int16) activations per 64 channels on the VNNI path; rows in
    `bf16_rows` (a bool mask) take the AMX path instead: bf16 activations times the dequantized weights
    rounded to bf16, summed in float32."""
    w = dequant(p)
    y = q8(x, qmax) @ w.T
    if bf16_rows is not None and bool(bf16_rows.any()):
        y[bf16_rows] = bf16(x[bf16_rows]) @ bf16(w).T
    return y + p.bias if p.bias.numel() else y


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(v: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    h = v.shape[-1] // 2
    a, b = v[..., :h], v[..., h:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def forward(weights, tokens, slots, positions, k_cache, v_cache, cos, sin, act_bits: int = 8,
            amx_rows: int = 0, head_bits: int = 16, kv_int8: bool = False, amx_batch: int = 0) -> torch.Tensor:
    """Logits [N, V] of every row; writes each row's key and value at its slot and position of the caches
    [L, S, Hkv, T, D] like the engine, and attends each row over its slot's positions 0..its own. With
    `amx_rows` as set on the engine, the rows it runs on AMX bf16 tiles are computed that way (rows on AMX
    int8 tiles, `amx_batch`, take the same int8 codes as the VNNI path: the same numbers here); `head_bits=8`:
    the head's activations as int8 with one scale a row, as the AMX head of a batch of `amx_batch` rows;
    `kv_int8`: each key and value is stored as the engine's int8 cache holds it (codes of its largest
    magnitude / 127, here kept dequantized in the float caches); with `amx_batch` set, a call that has rows on
    bf16 tiles runs all its rows there."""
    qmax = 127 if act_bits == 8 else 32767
    d, eps = weights.dims, weights.eps
    hq, hkv, hd = d.heads, d.kv_heads, d.head_dim
    tokens, slots, positions = (torch.as_tensor(t).long() for t in (tokens, slots, positions))
    x = weights.embed[tokens].float()
    n = x.shape[0]
    bf16_rows = amx_mask(slots, amx_rows) if act_bits == 8 else None
    if bf16_rows is not None and amx_batch and bool(bf16_rows.any()):
        bf16_rows[:] = True
    # rows on AMX bf16 tiles in a chunk of >= 32 rows (kChunkAttnRows) attend on the tiles too (llama_attn_amx.h)
    attn_bf16 = (bf16_rows & amx_mask(slots, 32) if bf16_rows is not None and amx_rows
                 else torch.zeros(len(slots), dtype=torch.bool))
    c, s = cos[positions][:, None], sin[positions][:, None]
    for layer, blk in enumerate(weights.blocks):
        qkv = linear(rms(x, blk.norm1, eps), blk.qkv, qmax, bf16_rows)
        q = qkv[:, : hq * hd].reshape(n, hq, hd)
        k = qkv[:, hq * hd: (hq + hkv) * hd].reshape(n, hkv, hd)
        if blk.q_norm.numel():  # Qwen3: each query and key head normalized before RoPE
            q = rms(q, blk.q_norm, eps)
        if blk.k_norm.numel():
            k = rms(k, blk.k_norm, eps)
        if getattr(blk, "rope", True):  # SmolLM3's NoPE layers skip it
            q, k = rope(q, c, s), rope(k, c, s)
        v = qkv[:, (hq + hkv) * hd:].reshape(n, hkv, hd)
        if kv_int8:
            k, v = int8_roundtrip(k), int8_roundtrip(v)
        for i in range(n):
            k_cache[layer, slots[i], :, positions[i]] = k[i]
            v_cache[layer, slots[i], :, positions[i]] = v[i]
        out = torch.empty(n, hq, hd)
        for i in range(n):
            t = int(positions[i]) + 1
            keys = k_cache[layer, slots[i], :, :t].float().repeat_interleave(hq // hkv, dim=0)
            vals = v_cache[layer, slots[i], :, :t].float().repeat_interleave(hq // hkv, dim=0)
            qi = q[i]
            if attn_bf16[i]:  # queries, keys, weights and values enter the tile products as bf16
                keys, vals, qi = bf16(keys), bf16(vals), bf16(qi)
            att = torch.softmax((keys @ qi[..., None])[..., 0] / hd ** 0.5, dim=-1)
            if attn_bf16[i]:
                att = bf16(att)
            out[i] = (att[:, None, :] @ vals)[:, 0]
        x = x + linear(out.reshape(n, hq * hd), blk.o, qmax, bf16_rows)
        gu = linear(rms(x, blk.norm2, eps), blk.gate_up, qmax, bf16_rows)
        inter = gu.shape[-1] // 2
        x = x + linear(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], blk.down, qmax, bf16_rows)
    h = rms(x, weights.final_norm, eps)
    if getattr(weights, "head4", None) is not None:  # an int4 head: int16 activations per 64 channels
        return linear(h, weights.head4, 32767)
    if weights.float_head.numel():  # the model's own float32 head: no rounding
        return h @ weights.float_head.T
    amax = h.abs().amax(-1, keepdim=True)
    h = q16(h) if head_bits == 16 else torch.round(h * 127 / amax) * amax / 127
    return h @ (weights.head_q.float() * weights.head_s[:, None]).T


def bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 (nearest even), as the AMX paths take their inputs, back in float32."""
    return x.bfloat16().float()


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Vectors [..., D] through int8 with one scale each (largest magnitude / 127), back to float."""
    step = x.abs().amax(-1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(x / step) * step


def amx_mask(slots: torch.Tensor, amx_rows: int) -> torch.Tensor:
    """Which rows the engine runs on AMX bf16 tiles: each slot's adjacent rows when there are `amx_rows` of them."""
    n = slots.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    i = 0
    while i < n:
        j = i + 1
        while j < n and slots[j] == slots[i]:
            j += 1
        if amx_rows and j - i >= amx_rows:
            mask[i:j] = True
        i = j
    return mask


def check_decode_steps(rt, weights, kc, vc, cos, sin, act_bits: int, starts: list[int], tok: torch.Tensor,
                       steps: int, bound: float) -> None:
    """`steps` decode steps of one row per slot (slot b at position starts[b] + step) on the engine against
    the reference (which keeps its own caches kc, vc), each row's logits within `bound` relative norm; the
    next tokens are the reference's arg-max."""
    slots = torch.arange(len(starts))
    for step in range(steps):
        pos = torch.tensor(starts) + step
        got = rt.forward(tok, slots, pos, slots)
        want = forward(weights, tok, slots, pos, kc, vc, cos, sin, act_bits)
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).tolist()
        assert max(err) < bound, (step, err)
        tok = want.argmax(-1)
