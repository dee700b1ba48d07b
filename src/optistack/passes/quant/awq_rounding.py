"""AWQ's scales judged by the rounding that will follow them: `awq{quantize=false},gptq` (`rounding=auto`
picks this with quantize=false; `rounding=rtn` turns it off).

The judge is held out: GPTQ's H comes from the first half of the calibration sequences and the candidates'
group outputs are compared on the other half. Judged in-sample (H and judge on the same tokens) it measured
worse than the RTN judge on SmolLM2 g128 (perplexity 16.77 against 16.54): GPTQ fits the tokens its H came
from, so in-sample it favours the grids it overfits best. Held out: 16.39 at g128 and 16.03 at g64, below
both `gptq` alone (16.50 / 16.33) and the RTN judge (16.54 / 16.07) on 4 evaluation chunks; on all 16, g64
holds (15.78 against 16.08) and g128 does not (16.38 against `gptq`'s 16.19) (docs/gptq.md).

AWQ's grid search keeps the alpha whose group output is closest to the float one *with round-to-nearest*
weights. When GPTQ rounds the scaled weights afterwards, that is the wrong judge: GPTQ corrects part of
the error the scales were chosen to avoid, so its best alpha is usually smaller than RTN's (measured on
SmolLM2, per group: 0.25 against 0.40, 0.10 against 0.15 ...), and a scale RTN likes can leave GPTQ worse
off than no scale at all. Judging every alpha by a GPTQ solve would cost `n_grid` solves per group; instead
the RTN search ranks the grid, and GPTQ rounding judges a shortlist: the `candidates` best alphas by RTN
and alpha = 0, the identity (s = 1: what `gptq` alone would round). The kept scales are then never worse
than none at all under GPTQ's rounding, by the search's own measure (the group output on the held-out
sequences), which is what "`awq,gptq` no worse than `gptq`" needs per group.

The GPTQ solve here is the `gptq` pass's (`gptq_solver.gptq_quantize`) with its defaults (`damp=0.01`, the
clipping search on, no `act_order`), on H = 2 X^T X / n of the group's inputs over the first half of the
calibration sequences, as seen through the candidate's scales (the inputs x / s have H / (s s^T)).
With one calibration sequence there is nothing to hold out: H and the judge share it.
"""
from __future__ import annotations

from typing import Callable

import torch

Rounder = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, scaled weight, s) -> rounded weight
ROUNDINGS = ("auto", "rtn", "gptq")


def gptq_rounder(x: torch.Tensor, group_size: int, zero_point: bool | str, param_dtype: torch.dtype) -> Rounder:
    """Rounds a weight scaled by s as `gptq` will, given the group's unscaled inputs `x` [..., in]."""
    from ...layers.int4_grid import dequantize
    from .gptq_solver import HessianSum, gptq_quantize

    hsum = HessianSum(x.shape[-1], x.device)
    hsum.add(x)
    h = hsum.hessian()

    def round_scaled(_name: str, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sd = s.to(h.device, torch.float64)
        gq, _ = gptq_quantize(w.float(), h / (sd[:, None] * sd[None, :]), group_size, zero_point, param_dtype,
                              clip=True)
        return dequantize(gq).to(w.device)

    return round_scaled


def shortlist(errors: list[tuple[float, float, torch.Tensor]], count: int) -> list[tuple[float, torch.Tensor]]:
    """(alpha, s) to judge again: the `count` lowest-error candidates and alpha = 0 (the identity)."""
    ranked = sorted(errors, key=lambda e: e[0])[:count]
    picked = {alpha: s for _, alpha, s in ranked}
    zero = next((e for e in errors if e[1] == 0.0), None)
    if zero is not None:
        picked.setdefault(0.0, zero[2])
    return sorted(picked.items(), key=lambda p: p[0])
