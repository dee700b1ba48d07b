"""The GPTQ math for one linear layer (Frantar et al., ICLR 2023): error-correcting int4 rounding.

For a layer y = x W^T with calibration inputs X, GPTQ minimizes ||X W^T - X Q^T||^2 column by column:
after column j is rounded, its error is spread over the columns not yet rounded, weighted by the
inverse of the inputs' second-moment matrix H = 2 X^T X / n. The inverse is taken once, through a
Cholesky factorization of the damped H (`damp` times the mean diagonal added to it), as the upper
Cholesky factor U of H^-1: the update for column j is err_j / U[j, j] times U[j, j+1:]. Columns are
processed in blocks of `block_size`; inside a block the updates are applied at once to the block
(the "lazy batch" update), and to the columns after it with one matrix product when it ends.

Groups and the grid: the same as `rtn-int4`'s (`layers.int4_grid.qparams`, one scale and zero per group of
`group_size` input channels, the kernels' `w = (q - 8) * scale + zero`), so the codes are exactly what
`Int4Linear` stores. Without `act_order`, a group's scale and zero come from its weights as updated by
the errors of the groups before it, when its first column is reached (blocks are cut at group
boundaries, so those weights are up to date). With `act_order`, columns are processed in order of
decreasing H diagonal (inputs with the most energy first) and the group parameters are fixed beforehand
from the weights as given ("static groups"): a group still covers contiguous input channels, so the
stored layout does not change. With H a multiple of the identity (uncorrelated inputs) there is nothing
to spread and the result is round-to-nearest, code for code (tested).

Input channels that calibration never saw (zero diagonal) get H[j, j] = 1: rounded to nearest, their
error spread nowhere. An in_features that `group_size` does not divide is rounded over its real
columns; the padding columns `Int4Linear` adds repeat the last group's real codes (they meet zero inputs).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ...core.errors import PassApplyError
from ...layers.int4_grid import MID as _MID
from ...layers.int4_grid import GroupQuant, dequantize, fake_quantize, pad_to_groups, qparams

DAMP_RETRIES = 4  # each multiplies the damping by 10
INNER = 16  # columns between rank-1 updates and a matrix product (a speed choice: same result)


@dataclass
class SolveStats:
    damp: float  # the damping used (relative to the mean diagonal); larger than asked after retries
    retries: int  # Cholesky retries with more damping
    error: float  # tr(D H D^T), D = W - Q: the layer's output error on the calibration inputs
    rtn_error: float  # the same for round-to-nearest on the same grid
    tokens: int = 0  # calibration tokens the layer saw


class HessianSum:
    """Running X^T X of a linear layer's inputs, in float64 (each batch's product in float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, product: torch.Tensor | None = None) -> torch.Tensor:
        """Add the inputs `x` [..., in] (or their precomputed `product` x^T x); returns the product."""
        if product is None:
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            product = x2.t() @ x2
        self.sum += product.to(self.sum.device, torch.float64)
        self.tokens += math.prod(x.shape[:-1])
        return product

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (float64)."""
        return self.sum * (2.0 / max(self.tokens, 1))


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """(U, damping used, retries): U the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1,
    float32. Dead inputs (zero diagonal) get 1 on the diagonal. If H is not positive definite after
    damping, the damping is multiplied by 10, up to `DAMP_RETRIES` times."""
    h = h.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    for retry in range(DAMP_RETRIES + 1):
        d = damp * 10 ** retry
        hd = h.flip(0, 1)  # J H J (J reverses the order; a copy)
        hd.diagonal().add_(d * mean)
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:  # J H J = M M^T, so H = (J M J)(J M J)^T and H^-1 = U^T U for U = J M^-1 J, upper
            upper = lower_triangular_inverse(low).flip(0, 1)
            if torch.isfinite(upper).all():  # its diagonal is 1 / M's: positive
                return upper.float(), d, retry
    raise PassApplyError(f"gptq: the inputs' Hessian is not positive definite even with damp={d:g} "
                         "(calibration activations contain inf/nan, or too few distinct tokens)")


def lower_triangular_inverse(m: torch.Tensor) -> torch.Tensor:
    """M^-1 of a lower-triangular M, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], so
    nearly all of it is matrix products (on every thread). Why not Cholesky-invert H and factor the inverse
    again (what this replaced): that is 4/3 K^3 operations in LAPACK's less parallel routines against about
    2/3 K^3 here; for a 5632-wide H (a 1.1B Llama's down_proj) 9.0 s became 3.2 s on 2 cores (Zen 4,
    2026-12-07), the two results equal to 1e-14 relative."""
    k = m.shape[0]
    if k <= 512:
        return torch.linalg.solve_triangular(m, torch.eye(k, dtype=m.dtype, device=m.device), upper=False)
    half = k // 2
    a, d = lower_triangular_inverse(m[:half, :half]), lower_triangular_inverse(m[half:, half:])
    out = torch.zeros_like(m)
    out[:half, :half], out[half:, half:] = a, d
    out[half:, :half] = -(d @ (m[half:, :half] @ a))
    return out


@contextlib.contextmanager
def _one_thread(t: torch.Tensor) -> Iterator[None]:
    """Intra-op threads off on CPU for GPTQ's column loop: its tensors are a few thousand elements, and waking a
    thread team for each of its small ops costs more than the op (15x slower on 2 busy cores). The
    factorization, the clipping searches and the products between blocks run outside it, on every thread."""
    if t.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 as float, the way `int4_grid.quantize` rounds."""
    return (torch.round((w - zero) / scale) + _MID).clamp_(0, 15)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr(D H D^T) for D = w - wq: the summed squared output error over the calibration inputs (x 2/n)."""
    d = (w - wq).float()
    return float(((d @ h) * d).sum())


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, zero_point: bool | str = True,
                  param_dtype: torch.dtype | None = None, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, clip: bool = False) -> tuple[GroupQuant, SolveStats]:
    """GPTQ of a [N, K] weight against the inputs' H [K, K]: codes, scales and zeros in `int4_grid`'s
    layout (padded to whole groups), and how it went."""
    return _gptq(w, h, group_size, zero_point, param_dtype, block_size, damp, act_order, clip)


def _ranges(w: torch.Tensor, h: torch.Tensor, start: int, g: int, zero_point: bool | str,
            param_dtype: torch.dtype | None, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] per (row, group) of `w` [N, columns start.. of whole groups, the last maybe partial]: the
    groups' ranges, or with `clip` the ranges shrunk (AWQ's clipping search) to minimize d^T H_gg d, each
    group's own share of the output error."""
    if not clip:
        return torch.aminmax(pad_to_groups(w, g).reshape(w.shape[0], -1, g), dim=-1)
    from .awq_search import FINAL_CLIP_RATIOS, Quantizer, search_clip

    width = w.shape[1]
    hp = torch.zeros(math.ceil(width / g) * g, math.ceil(width / g) * g, device=w.device)
    hp[:width, :width] = h[start:start + width, start:start + width]
    moments = torch.stack([hp[i:i + g, i:i + g] for i in range(0, hp.shape[0], g)])
    return search_clip(w, moments, Quantizer(g, zero_point, param_dtype or torch.float32, True),
                       FINAL_CLIP_RATIOS, refine=True)


def _gptq(w: torch.Tensor, h: torch.Tensor, group_size: int, zero_point: bool | str, param_dtype: torch.dtype | None,
          block_size: int, damp: float, act_order: bool, clip: bool) -> tuple[GroupQuant, SolveStats]:
    n, k = w.shape
    g = group_size
    if g % INNER:
        raise PassApplyError(f"gptq: group size {g} is not a multiple of {INNER}")
    groups = math.ceil(k / g)
    weight = w.detach().float().clone()
    scale = torch.empty(n, groups, device=weight.device)
    zero = torch.empty_like(scale)
    perm = None
    hf = h.to(device=weight.device, dtype=torch.float32) if clip else h
    if act_order:  # static groups: fixed from the weights as given, then columns in order of energy
        lo, hi = _ranges(weight, hf, 0, g, zero_point, param_dtype, clip)
        scale, zero = qparams(lo, hi, zero_point, param_dtype)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True).to(weight.device)
        weight = weight[:, perm]
        h = h[perm.to(h.device)][:, perm.to(h.device)]
        group_of = (perm // g).tolist()
        step = block_size
    else:
        group_of = [j // g for j in range(k)]
        step = math.ceil(block_size / g) * g  # whole groups per block: a group's weights are current
    u, used, retries = inverse_cholesky(h, damp)
    u = u.to(weight.device)
    codes = torch.empty(n, k, device=weight.device)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = weight[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, INNER):  # rank-1 updates inside 16 columns, a product for the rest
            j2 = min(j1 + INNER, i2 - i1)
            col = i1 + j1
            if perm is None and col % g == 0:  # groups start at sub-block starts (g % INNER == 0): w1 is current
                lo, hi = _ranges(w1[:, j1:j1 + g], hf, col, g, zero_point, param_dtype, clip)
                scale[:, group_of[col]], zero[:, group_of[col]] = qparams(lo[:, 0], hi[:, 0], zero_point, param_dtype)
            with _one_thread(w1):
                for i in range(j1, j2):
                    col = i1 + i
                    s, z = scale[:, group_of[col]], zero[:, group_of[col]]
                    col_w = w1[:, i]
                    q = _round(col_w, s, z)
                    codes[:, col] = q
                    e = (col_w - ((q - _MID) * s + z)) / u1[i, i]
                    w1[:, i:j2].sub_(e[:, None] * u1[i, i:j2][None, :])
                    err1[:, i] = e
                w1[:, j2:].sub_(err1[:, j1:j2] @ u1[j1:j2, j2:])
        weight[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    gq = GroupQuant(pad_to_groups(codes, g).to(torch.uint8), scale, zero, g, k)
    return gq, SolveStats(used, retries, 0.0, 0.0)


def error_vs_rtn(w: torch.Tensor, gq: GroupQuant, h: torch.Tensor, zero_point: bool | str,
                 param_dtype: torch.dtype | None, stats: SolveStats, max_rows: int = 256) -> SolveStats:
    """Fill `stats.error` / `stats.rtn_error`: the output error of GPTQ's weight and of round-to-nearest
    on the same grid, on up to `max_rows` evenly spaced output rows (rows add independently)."""
    rows = torch.linspace(0, w.shape[0] - 1, min(max_rows, w.shape[0])).round().long().unique().to(w.device)
    wf = w.detach().float()[rows]
    hf = h.to(device=wf.device, dtype=torch.float32)
    rtn = fake_quantize(wf, gq.group_size, zero_point, param_dtype)
    mine = dequantize(GroupQuant(gq.q[rows], gq.scale[rows], gq.zero[rows], gq.group_size, gq.in_features))
    stats.error, stats.rtn_error = output_error(wf, mine, hf), output_error(wf, rtn, hf)
    return stats
