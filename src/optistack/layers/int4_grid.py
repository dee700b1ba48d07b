"""Group-wise int4 weights: the grid every int4 layer, pass and kernel of optistack shares.

Per output row, groups of `group_size` consecutive input channels, one scale and one offset per
group, in the convention of torch's int4 kernels ("tinygemm"; checked numerically on torch 2.13):
`w = (q - 8) * scale + zero`, q in 0..15, `zero` the float value of the middle code 8.
Asymmetric (`zero_point=True`): scale = (max - min) / 15 over the range widened to take in 0, zero =
round(min / scale + 8) * scale: a whole number of steps, so w = (q - zp) * scale with an integer zero
point zp = -zero / scale, the form compressed-tensors, vLLM, AutoAWQ and GPTQ store (a float zero would
not survive `save_pretrained`). The rounding shifts the grid by under half a step, so the group's
extreme values may clip by up to scale/2 more. `zero_point="float"` (the passes' `zero_grid=float`)
keeps the float zero of the group's own range instead: lower error (SmolLM2 AWQ g64 perplexity 15.88
vs 16.42 with integer zeros), saved only by `result.save`. Symmetric: scale = max|w| / 7, zero = 0.
Every other weight inside its group's range is within scale/2 of its dequantized value.

An in_features that is not a multiple of `group_size` is padded up to one (the padded weight columns
copy real columns of the same group, so they do not widen its range).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MID = 8  # the middle code of 4-bit: w = (q - 8) * scale + zero


@dataclass
class GroupQuant:
    """Int4 codes (uint8 0..15, [N, K padded]) with per-group scale and zero ([N, K padded / g])."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    in_features: int

    @property
    def padded_in_features(self) -> int:
        return self.q.shape[1]


def padded_size(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size) * group_size


def pad_to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K padded]: extra columns repeat the real columns of the last group."""
    k = w.shape[1]
    kp = padded_size(k, group_size)
    if kp == k:
        return w
    start = kp - group_size  # the last group holds columns start..k-1 for real
    idx = start + torch.arange(kp - k, device=w.device) % (k - start)
    return torch.cat([w, w[:, idx]], dim=1)


FLOAT_ZERO = "float"  # `zero_point` value for float (not whole-step) zero points


def qparams(wmin: torch.Tensor, wmax: torch.Tensor, zero_point: bool = True,
            param_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for groups whose values lie in [wmin, wmax]; rounded to `param_dtype` if given
    (the dtype the kernel keeps them in), returned as float32."""
    if zero_point == FLOAT_ZERO:  # any offset: the tightest grid, but only optistack's own save keeps it
        scale = ((wmax - wmin) / 15).clamp(min=1e-8)
        if param_dtype is not None and param_dtype != torch.float32:
            scale = scale.to(param_dtype).float().clamp(min=1e-8)
        zero = wmin + MID * scale
    elif zero_point:  # the range takes in 0, so the zero point is a whole code in 0..15 (see the docstring)
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        scale = ((wmax - wmin) / 15).clamp(min=1e-8)
        if param_dtype is not None and param_dtype != torch.float32:
            scale = scale.to(param_dtype).float().clamp(min=1e-8)
        zero = torch.round(wmin / scale + MID).clamp_(MID - 15, MID) * scale
    else:
        scale = (torch.maximum(wmin.abs(), wmax.abs()) / 7).clamp(min=1e-8)
        zero = torch.zeros_like(scale)
    if param_dtype is not None and param_dtype != torch.float32:
        scale, zero = scale.to(param_dtype).float().clamp(min=1e-8), zero.to(param_dtype).float()
    return scale.float(), zero.float()


def quantize(w: torch.Tensor, group_size: int, zero_point: bool = True, param_dtype: torch.dtype | None = None,
             wmin: torch.Tensor | None = None, wmax: torch.Tensor | None = None) -> GroupQuant:
    """Group-wise int4 of a [N, K] weight. `wmin`/`wmax` ([N, groups]) override the groups' own range
    (clipping); values outside it saturate."""
    n, k = w.shape
    wg = pad_to_groups(w.detach().float(), group_size).reshape(n, -1, group_size)
    if wmin is None or wmax is None:
        wmin, wmax = torch.aminmax(wg, dim=-1)
    scale, zero = qparams(wmin, wmax, zero_point, param_dtype)
    q = torch.round((wg - zero[..., None]) / scale[..., None]) + MID
    q = q.clamp_(0, 15).to(torch.uint8).reshape(n, -1)
    return GroupQuant(q, scale, zero, group_size, k)


def dequantize(gq: GroupQuant, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, g = gq.q.shape[0], gq.group_size
    w = (gq.q.reshape(n, -1, g).to(dtype) - MID) * gq.scale[..., None].to(dtype) + gq.zero[..., None].to(dtype)
    return w.reshape(n, -1)[:, : gq.in_features]


def fake_quantize(w: torch.Tensor, group_size: int, zero_point: bool = True, param_dtype: torch.dtype | None = None,
                  wmin: torch.Tensor | None = None, wmax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (float32, same shape): what the int4 layer will compute with.
    Equal to `dequantize(quantize(...))`, in fewer passes over memory (AWQ calls it in its searches)."""
    n, k = w.shape
    wg = pad_to_groups(w.detach().float(), group_size).reshape(n, -1, group_size)
    if wmin is None or wmax is None:
        wmin, wmax = torch.aminmax(wg, dim=-1)
    scale, zero = qparams(wmin, wmax, zero_point, param_dtype)
    return fake_quantize_groups(wg, scale, zero).reshape(n, -1)[:, :k]


def fake_quantize_groups(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Dequantized values of grouped weights `wg` [..., g] for `scale`/`zero` [...] (broadcasting)."""
    scale, zero = scale[..., None], zero[..., None]
    q = (wg - zero).div_(scale).round_().clamp_(-MID, 15 - MID)
    return q.mul_(scale).add_(zero)
