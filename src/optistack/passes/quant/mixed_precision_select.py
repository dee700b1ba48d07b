"""The parts of `mixed-precision` that decide: what each choice stores, what it costs the model's loss,
and which choice each layer gets under the bit budget.

Bits, counted as stored: the bytes of every buffer the quantized layer keeps for its weight (bias
excluded), over the layer's real weights (out x in). Int4 (`Int4Linear`): 4-bit codes over in_features
padded to whole groups, plus one scale and one zero per group and row in the kernel's dtype (bfloat16
on the int4 kernels, float32 on the dequant fallback): g64 = 4 + 2*16/64 = 4.5 bits. Int8
(`Int8Linear`): 8 bits plus one float32 scale per row. Float: the weight's own element size. The same
measure as the int4 passes' `bits_per_weight`.

Sensitivity of a choice c for a layer with weight W, rounded weight Q_c and D = W - Q_c: with
H = X^T X / n over the calibration inputs X of the layer and f_i the mean squared gradient of the
calibration loss (next-token cross-entropy, summed over tokens) with respect to output channel i,

    s_c = 1/2 * sum_i f_i * d_i^T H d_i

the second-order (diagonal Fisher) estimate of how much the mean per-token loss rises when the layer's
outputs move by X D^T, with the gradients and the inputs taken as independent. So s is in nats per
token, adds across layers, and exp(sum s) predicts the perplexity ratio. Without a loss
(`sensitivity=output`, or a model with no token loss) f_i = 1: the layer's output error, GPTQ's
objective. Q_c is round-to-nearest on the choice's grid (cheap; GPTQ lowers each error by a similar
factor, so the ranking holds).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch

FLOAT = "float"
INT8 = "int8"
INT4_GROUPS = (32, 64, 128, 256)
CHOICE_NAMES = (*(f"int4-g{g}" for g in INT4_GROUPS), INT8, FLOAT)


def group_of(choice: str) -> int | None:
    """The int4 group size of `choice`, None for int8 / float."""
    return int(choice.removeprefix("int4-g")) if choice.startswith("int4-g") else None


def stored_bits(choice: str, out_features: int, in_features: int, device: Any, float_bytes: int = 4) -> int:
    """Bits the layer stores for its weight under `choice` (see the module docstring)."""
    from ...layers.int4 import choose_kernel, param_dtype_for
    from ...layers.int4_grid import padded_size

    n, k = out_features, in_features
    g = group_of(choice)
    if g is not None:
        kernel, _ = choose_kernel(device, n, k, g)
        kp = padded_size(k, g)
        param = torch.finfo(param_dtype_for(kernel)).bits
        return 4 * n * kp + 2 * param * n * (kp // g)
    if choice == INT8:
        return 8 * n * k + 32 * n
    return 8 * float_bytes * n * k


def rounded(w: torch.Tensor, choice: str, zero_point: bool | str, device: Any) -> torch.Tensor:
    """W as the choice would store it, dequantized (float32): round to nearest on its grid."""
    from ...layers.int4 import choose_kernel, param_dtype_for
    from ...layers.int4_grid import fake_quantize

    w = w.detach().float()
    g = group_of(choice)
    if g is not None:
        kernel, _ = choose_kernel(device, w.shape[0], w.shape[1], g)
        return fake_quantize(w, g, zero_point, param_dtype_for(kernel))
    if choice == INT8:  # as Int8Linear.from_linear
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        return torch.round(w / scale).clamp_(-127, 127) * scale
    return w


def sensitivities(w: torch.Tensor, h: torch.Tensor, fisher: torch.Tensor | None, choices: list[str],
                  zero_point: bool | str, device: Any) -> dict[str, float]:
    """{choice: s_c} for one layer: `h` = X^T X / n [in, in], `fisher` = f [out] or None (f = 1)."""
    hf = h.to(device=w.device, dtype=torch.float32)
    out = {}
    for c in choices:
        d = w.detach().float() - rounded(w, c, zero_point, device)
        rows = ((d @ hf) * d).sum(dim=1).double()
        f = torch.ones_like(rows) if fisher is None else fisher.to(rows.device, torch.float64)
        out[c] = 0.5 * float((f * rows).sum())
    return out


@dataclass
class Unit:
    """Layers that take one choice together (one layer, or layers reading the same input when tied)."""

    names: list[str]
    weights: int  # real weights (out x in) of all its layers
    cost: dict[str, int]  # choice -> stored bits of all its layers
    sens: dict[str, float]  # choice -> summed sensitivity


def _hull(unit: Unit) -> list[str]:
    """The unit's choices on the lower convex hull of (bits, sensitivity), cheapest first: the only
    steps a greedy by sensitivity saved per extra bit should take."""
    by_cost = sorted(unit.cost, key=lambda c: (unit.cost[c], unit.sens[c]))
    useful: list[str] = []
    for c in by_cost:  # drop choices no better than a cheaper one
        if not useful or unit.sens[c] < unit.sens[useful[-1]]:
            useful.append(c)
    hull: list[str] = []
    for c in useful:  # keep the slopes (saved per bit) decreasing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            s_ab = (unit.sens[a] - unit.sens[b]) / max(unit.cost[b] - unit.cost[a], 1)
            s_bc = (unit.sens[b] - unit.sens[c]) / max(unit.cost[c] - unit.cost[b], 1)
            if s_bc >= s_ab:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


class BudgetError(ValueError):
    """The budget is below what the cheapest choices store."""


def select(units: list[Unit], budget_bits: float) -> dict[int, str]:
    """{unit index: choice} with total stored bits <= budget_bits and low summed sensitivity: every
    unit starts at its cheapest hull choice, then the upgrade that saves the most sensitivity per extra
    bit is taken while it fits (the greedy for the multiple-choice knapsack, optimal up to the last
    upgrade that did not fit); leftover bits then go to any single better choice that fits."""
    hulls = [_hull(u) for u in units]
    pick = {i: 0 for i in range(len(units))}  # position on the hull
    used = sum(u.cost[h[0]] for u, h in zip(units, hulls))
    if used > budget_bits:
        raise BudgetError(f"{used / sum(u.weights for u in units):.3f}")
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h, p = hulls[i], pick[i]
        if p + 1 < len(h):
            u = units[i]
            gain = (u.sens[h[p]] - u.sens[h[p + 1]]) / max(u.cost[h[p + 1]] - u.cost[h[p]], 1)
            heapq.heappush(heap, (-gain, i))

    for i in range(len(units)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        u, h, p = units[i], hulls[i], pick[i]
        extra = u.cost[h[p + 1]] - u.cost[h[p]]
        if used + extra <= budget_bits:
            used += extra
            pick[i] = p + 1
            push(i)
    chosen = {i: hulls[i][pick[i]] for i in range(len(units))}
    for i in sorted(range(len(units)), key=lambda j: -units[j].sens[chosen[j]]):  # fill what is left
        u, now = units[i], chosen[i]
        better = [c for c in u.cost if u.sens[c] < u.sens[now] and used - u.cost[now] + u.cost[c] <= budget_bits]
        if better:
            best = min(better, key=lambda c: u.sens[c])
            used += u.cost[best] - u.cost[now]
            chosen[i] = best
    return chosen


def describe(unit: Unit, choice: str) -> str:
    """One layer's line in the report: its choice, then every choice's sensitivity, cheapest first
    (tied layers show their unit's sums)."""
    every = ", ".join(f"{c} {unit.sens[c]:.3g}" for c in sorted(unit.sens, key=lambda c: unit.cost[c]))
    tied = f"; tied with {len(unit.names) - 1} more" if len(unit.names) > 1 else ""
    return f"{choice} ({every}{tied})"
