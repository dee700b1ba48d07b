"""The AWQ math for one decoder layer: scale groups, the alpha grid search, folding, clipping.

A *scale group* is a set of Linear layers reading the same input, the module before them whose
output channels can absorb a per-channel factor, and the module whose output judges a candidate.
Which groups a block has comes from `awq_mappings.py` (per architecture); for Llama:

    input_layernorm          -> q_proj, k_proj, v_proj   judged at self_attn's output
    v_proj (rows)            -> o_proj                   judged at o_proj (only when v_proj's outputs
                                                         are o_proj's inputs one to one: no GQA)
    post_attention_layernorm -> gate_proj, up_proj       judged at the MLP's output
    up_proj (rows)           -> down_proj                judged at down_proj

For s = mean|x|^alpha (normalized so max*min = 1) the group computes Q(W diag(s)) (x / s): input
channels with large mean |x| get finer effective quantization steps. alpha runs over 0, 1/n, ...,
(n-1)/n and the s whose group output is closest (MSE) to the float output is kept; 1/s is folded
into the previous module (exact in real arithmetic).

Clipping (`clip=True`): each (row, group) range [min, max] may shrink to [r_lo min, r_hi max]. The
error of a candidate is the group's share of the layer output error over *all* calibration tokens,
d^T C_g d with d = w_g - Q(w_g) and C_g the inputs' second-moment matrix for that group, so no
forward pass is needed. During the alpha search each candidate weight is clipped with a coarse
symmetric grid (so alpha is chosen for the weights that will really be stored); the kept weights get
a finer search (symmetric, then min and max refined one at a time). q_proj/k_proj (and the q/k rows
of fused projections) are not clipped: their error acts through the attention softmax, which the
per-layer output error does not see. Groups with no `prev` (nowhere exact to fold a scale) get the
clipping search only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...layers.int4_grid import fake_quantize, fake_quantize_groups, pad_to_groups, qparams
from ..calibration import input_channel_stats
from .awq_rounding import Rounder, shortlist

SEARCH_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)
FINAL_CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))
Inputs = tuple[tuple, dict]  # (args, kwargs) a module was called with


@dataclass
class ScaleGroup:
    label: str
    prev: nn.Module | None  # None: clipping only
    linears: dict[str, nn.Linear]  # names relative to the decoder layer
    inspect: nn.Module
    prev_rows: torch.Tensor | None = None  # prev's output rows feeding the linears (None: all)


NoClip = dict[str, "torch.Tensor | None"]  # layer -> rows never clipped (None: the whole layer)
LLAMA_NO_CLIP: NoClip = {"self_attn.q_proj": None, "self_attn.k_proj": None}


@dataclass(frozen=True)
class Quantizer:
    group_size: int
    zero_point: bool | str  # True (integer grid), False (symmetric) or int4.FLOAT_ZERO
    param_dtype: torch.dtype
    clip: bool


def llama_groups(layer: nn.Module) -> list[ScaleGroup]:
    attn, mlp = layer.self_attn, layer.mlp
    groups = [ScaleGroup("qkv", layer.input_layernorm, {f"self_attn.{n}": getattr(attn, n) for n in
                                                        ("q_proj", "k_proj", "v_proj")}, attn)]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(ScaleGroup("o", attn.v_proj, {"self_attn.o_proj": attn.o_proj}, attn.o_proj))
    groups.append(ScaleGroup("gate_up", layer.post_attention_layernorm,
                             {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj}, mlp))
    groups.append(ScaleGroup("down", mlp.up_proj, {"mlp.down_proj": mlp.down_proj}, mlp.down_proj))
    return groups


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """prev's output channels (`rows` of them, in order, when given) / s, the linears' input columns * s:
    the function is unchanged."""
    idx = slice(None) if rows is None else rows.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight[idx] = prev.weight[idx] / s[:, None].to(prev.weight.dtype)
    else:  # a norm: y = weight * normalized(x) (+ bias)
        prev.weight[idx] = prev.weight[idx] / s.to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias[idx] = prev.bias[idx] / s.to(prev.bias.dtype)
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def output_of(module: nn.Module, inp: Inputs) -> torch.Tensor:
    out = module(*inp[0], **inp[1])
    return out[0] if isinstance(out, (tuple, list)) else out


def first_tensor(inp: Inputs) -> torch.Tensor:
    return inp[0][0] if inp[0] else inp[1]["hidden_states"]


def row_range(inp: Inputs, start: int, stop: int) -> Inputs:
    """Sequences [start, stop) of a batched call: tensors (also inside tuples) whose batch dim is the
    batch's are cut; broadcast ones (batch 1) and non-tensors pass as they are."""
    n = first_tensor(inp).shape[0]

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n and n > 1:
            return v[start:stop]
        return tuple(cut(e) for e in v) if isinstance(v, tuple) else v

    return tuple(cut(a) for a in inp[0]), {k: cut(v) for k, v in inp[1].items()}


def first_rows(inp: Inputs, n: int) -> Inputs:
    """The first `n` sequences of a batched call (all of them when there are fewer)."""
    return row_range(inp, 0, n)


def scales_for(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.clamp(min=1e-6).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def group_moments(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G, g, g]: (1/T) sum_t x_t,g x_t,g^T per input group (zero columns for Int4Linear's padding)."""
    x = x.reshape(-1, x.shape[-1]).float()
    pad = -x.shape[1] % group_size
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
    xg = x.reshape(x.shape[0], -1, group_size).transpose(0, 1)  # [G, T, g]
    return torch.bmm(xg.transpose(1, 2), xg) / x.shape[0]


def scaled_moments(moments: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The moments of x / s, from those of x."""
    g = moments.shape[-1]
    sp = torch.cat([s, s.new_ones(-s.shape[0] % g)]).reshape(-1, g)
    return moments / (sp[:, :, None] * sp[:, None, :])


def _best_ranges(wg: torch.Tensor, moments: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q: Quantizer,
                 best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """(error, lo, hi) per (row, group): the best of `best` and the P candidates lo/hi [P, R, G]."""
    p_all, r, g_count, g = lo.shape[0], *wg.shape[:2], wg.shape[2]
    chunk = max(1, (1 << 24) // wg.numel())
    for start in range(0, p_all, chunk):
        lo_c, hi_c = lo[start:start + chunk], hi[start:start + chunk]
        scale, zero = qparams(lo_c, hi_c, q.zero_point, q.param_dtype)
        d = fake_quantize_groups(wg, scale, zero).sub_(wg)  # [P, R, G, g]
        dd = d.permute(2, 0, 1, 3).reshape(g_count, -1, g)
        err = (torch.bmm(dd, moments) * dd).sum(-1).reshape(g_count, -1, r).permute(1, 2, 0)  # [P, R, G]
        err_min, idx = err.min(0)
        pick = idx[None]
        cand = (err_min, lo_c.gather(0, pick)[0], hi_c.gather(0, pick)[0])
        if best is None:
            best = cand
        else:
            better = cand[0] < best[0]
            best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
    return best


@torch.no_grad()
def search_clip(w: torch.Tensor, moments: torch.Tensor, q: Quantizer, ratios: tuple[float, ...],
                refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) [lo, hi] minimizing d^T C_g d: the range shrunk by each of `ratios`; with
    `refine`, then lo alone and hi alone over the same ratios."""
    wg = pad_to_groups(w.detach().float(), q.group_size).reshape(w.shape[0], -1, q.group_size)
    lo0, hi0 = torch.aminmax(wg, dim=-1)
    r = torch.tensor(ratios, dtype=wg.dtype, device=wg.device)[:, None, None]
    best = _best_ranges(wg, moments, lo0 * r, hi0 * r, q, None)
    if refine:
        best = _best_ranges(wg, moments, lo0 * r, best[2].expand_as(lo0 * r), q, best)
        best = _best_ranges(wg, moments, best[1].expand_as(hi0 * r), hi0 * r, q, best)
    return best[1], best[2]


def clip_ranges(name: str, w: torch.Tensor, moments: torch.Tensor, q: Quantizer, no_clip: NoClip, final: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Searched [lo, hi] per (row, group), with the rows `no_clip` protects kept at their full range;
    (None, None) for a layer that is not clipped at all."""
    if name in no_clip and no_clip[name] is None:
        return None, None
    lo, hi = (search_clip(w, moments, q, FINAL_CLIP_RATIOS, refine=True) if final
              else search_clip(w, moments, q, SEARCH_CLIP_RATIOS, refine=False))
    rows = no_clip.get(name)
    if rows is not None:
        wg = pad_to_groups(w.detach().float(), q.group_size).reshape(w.shape[0], -1, q.group_size)
        lo0, hi0 = torch.aminmax(wg, dim=-1)
        rows = rows.to(lo.device)
        lo[rows], hi[rows] = lo0[rows], hi0[rows]
    return lo, hi


def quantize_for_search(name: str, w: torch.Tensor, moments: torch.Tensor | None, q: Quantizer,
                        no_clip: NoClip | None = None) -> torch.Tensor:
    no_clip = LLAMA_NO_CLIP if no_clip is None else no_clip
    if moments is None or not q.clip:
        return fake_quantize(w, q.group_size, q.zero_point, q.param_dtype)
    lo, hi = clip_ranges(name, w, moments, q, no_clip, final=False)
    return fake_quantize(w, q.group_size, q.zero_point, q.param_dtype, lo, hi)


@torch.no_grad()
def search_scale(group: ScaleGroup, x_mean: torch.Tensor, moments: torch.Tensor, inp: Inputs, n_grid: int,
                 quantized: set[str], q: Quantizer, no_clip: NoClip | None = None, rounder: Rounder | None = None,
                 candidates: int = 3, judge_inp: Inputs | None = None,
                 judge_z: float = 0.0) -> tuple[torch.Tensor, float, float, float]:
    """(s, alpha, baseline error, best error): grid search of the group-output MSE on `inp`, judged with
    round-to-nearest (baseline: unscaled RTN); with `rounder`, the `candidates` best and the identity are
    judged again with that rounding, on `judge_inp` (baseline: the identity under it; `awq_rounding.py`),
    and a scale is kept over the identity only where it is lower by `judge_z` standard errors of the
    per-sequence difference (`clearly_lower`)."""
    ref = output_of(group.inspect, inp)
    on = inp if judge_inp is None else judge_inp
    on_ref = ref if rounder is None or judge_inp is None else output_of(group.inspect, on)
    originals = {n: lin.weight.data for n, lin in group.linears.items()}

    def errors_with(s: torch.Tensor | None, rnd: Callable[[str, torch.Tensor], torch.Tensor], on: Inputs = inp,
                    ref: torch.Tensor = ref) -> torch.Tensor:  # the group-output MSE of each sequence
        for n, lin in group.linears.items():
            if n in quantized:
                w = originals[n] if s is None else originals[n] * s[None, :]
                wq = rnd(n, w)
                lin.weight.data = (wq if s is None else wq / s[None, :]).to(originals[n].dtype)
        d = (output_of(group.inspect, on) - ref).float().pow(2)
        return d.reshape(d.shape[0], -1).mean(1) if d.dim() > 2 else d.mean().reshape(1)

    def error_with(s: torch.Tensor | None, rnd: Callable[[str, torch.Tensor], torch.Tensor]) -> float:
        return float(errors_with(s, rnd).mean())

    def rtn(clip_moments: torch.Tensor | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
        return lambda n, w: quantize_for_search(n, w, clip_moments, q, no_clip)

    try:
        rtn_err = error_with(None, rtn(None))
        errors = []
        for i in range(n_grid):
            s = scales_for(x_mean, i / n_grid).to(ref.device)
            errors.append((error_with(s, rtn(scaled_moments(moments, s))), i / n_grid, s))
        if rounder is not None:
            judged = [(errors_with(s, lambda n, w, s=s: rounder(n, w, s), on, on_ref), alpha, s)
                      for alpha, s in shortlist(errors, candidates)]
            identity = next(v for v, alpha, _ in judged if alpha == 0.0)
            rtn_err = float(identity.mean())
            errors = [(float(v.mean()), alpha, s) for v, alpha, s in judged
                      if alpha == 0.0 or clearly_lower(v, identity, judge_z)]
    finally:
        for n, lin in group.linears.items():
            lin.weight.data = originals[n]
    err, alpha, s = min(errors, key=lambda e: e[0])
    return s, alpha, rtn_err, err


def clearly_lower(errors: torch.Tensor, baseline: torch.Tensor, z: float) -> bool:
    """Whether per-sequence `errors` are lower than `baseline`'s (the same sequences) by more than `z` standard
    errors of their paired difference; with one sequence, whether it is lower at all."""
    d = (errors - baseline).double()
    if d.numel() < 2:
        return bool(d.mean() < 0)
    return bool(d.mean() < -z * d.std() / d.numel() ** 0.5)


@dataclass
class LayerReport:
    alphas: dict[str, float]
    rtn_mse: float  # group-output MSE of plain round-to-nearest, summed over groups
    awq_mse: float  # the same with the kept scales (and search-time clipping)
    folds: list = field(default_factory=list)  # (prev, linears, s, prev_rows) of every folded scale


@torch.no_grad()
def awq_layer(layer: nn.Module, inp: Inputs, quantized: set[str], q: Quantizer, n_grid: int, search_samples: int,
              swap: Callable[[str, nn.Linear, Any, Any], None] | None, groups: list[ScaleGroup] | None = None,
              no_clip: NoClip | None = None, rounding: Callable[[torch.Tensor], Rounder] | None = None,
              candidates: int = 3, judge_z: float = 0.0) -> LayerReport:
    """Search and fold scales for every group of `layer` (default: Llama's), clip, then
    `swap(name, linear, wmin, wmax)` each quantized linear (names relative to the layer); with `swap`
    None, stop after folding (no final clipping search: the layers stay float). `inp` is
    what the layer is called with, on every calibration sequence: statistics and clipping use all
    of them, the alpha search the first `search_samples`. `rounding(x)` (x: a group's inputs) gives the
    rounding that will follow, to judge the search's best `candidates` again (`awq_rounding.py`)."""
    groups = llama_groups(layer) if groups is None else groups
    no_clip = LLAMA_NO_CLIP if no_clip is None else no_clip
    captured: dict[int, Inputs] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured[id(module)] = (args, kwargs)

    firsts = {next(iter(g.linears)): next(iter(g.linears.values())) for g in groups}
    handles = [g.inspect.register_forward_pre_hook(grab, with_kwargs=True) for g in groups]
    try:
        stats = input_channel_stats(layer, [inp], firsts, call=lambda m, b: m(*b[0], **b[1]))
    finally:
        for h in handles:
            h.remove()

    report = LayerReport({}, 0.0, 0.0)
    final_moments: dict[str, torch.Tensor] = {}
    for g in groups:
        if not quantized & set(g.linears):
            continue
        g_inp = captured[id(g.inspect)]
        x = first_tensor(g_inp)
        x_mean = stats[next(iter(g.linears))].mean_abs.to(x.device)
        moments = group_moments(x, q.group_size)
        if g.prev is None:  # nowhere to fold a scale: clipping only
            final_moments.update({name: moments for name in g.linears})
            continue
        rounder, judge_inp = None, None
        if rounding is not None:  # GPTQ's H from the first half of the sequences, judged on the other half
            half = (x.shape[0] + 1) // 2 if x.dim() > 2 and x.shape[0] > 1 else x.shape[0]
            rounder = rounding(x[:half])
            judge_inp = row_range(g_inp, half, x.shape[0]) if half < x.shape[0] else g_inp
        s, alpha, rtn_err, err = search_scale(g, x_mean, moments, first_rows(g_inp, search_samples), n_grid,
                                              quantized, q, no_clip, rounder, candidates, judge_inp,
                                              judge_z)
        fold_scale(g.prev, list(g.linears.values()), s, g.prev_rows)
        report.folds.append((g.prev, list(g.linears.values()), s, g.prev_rows))
        report.alphas[g.label] = alpha
        report.rtn_mse += rtn_err
        report.awq_mse += err
        final_moments.update({name: scaled_moments(moments, s) for name in g.linears})
    if swap is None:
        return report
    for name in sorted(quantized):
        lin = layer.get_submodule(name)
        wmin = wmax = None
        if q.clip and name in final_moments:
            wmin, wmax = clip_ranges(name, lin.weight, final_moments[name], q, no_clip, final=True)
        swap(name, lin, wmin, wmax)
    return report
