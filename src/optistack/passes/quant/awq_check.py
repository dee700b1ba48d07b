"""`awq{quantize=false},gptq{awq_check=block}`: GPTQ keeps a block's AWQ scales only where, rounded by GPTQ on its
real inputs, the block is closer to the float one with them than without (held out). The default judges the
whole model instead (`awq_model_check.py`); this module also holds the record of the folds both undo.

Why: AWQ judges each group's scales on the float model's inputs, group by group (`awq_rounding.py`); GPTQ
then rounds block after block on the rounded blocks' outputs. On SmolLM2 at g128 (16 evaluation chunks)
the scales the group judge kept left `awq,gptq` at perplexity 16.38 against `gptq` alone's 16.19, while at
g64 they helped (15.78 against 16.08; docs/gptq.md). So, in GPTQ's block loop, before a block is rounded:
two copies of it, as AWQ left it and with its scales undone, are each rounded by GPTQ with H from the first
half of the calibration sequences and scored on the other half (the block's output against the float
block's, on the same inputs: folding scales does not change the float function); where the copy without
scales scores lower, the real block's scales are undone, and GPTQ rounds it as usual with all sequences.
The folds are those the `awq` pass recorded on the model (`optistack_awq_folds`): a norm or linear before the
group divided by s, the group's linears multiplied by it; undoing is the same fold by 1 / s.

Measured on SmolLM2 (16 evaluation chunks, integer zero points, 2026-12-06): with the check, 16.38 at g128 and
15.78 at g64, the same as without it, in 337 / 297 s against 237 / 212: the block judge, too, prefers the
scales at g128, where `gptq` alone scores better (16.19). So it is not the default (`gptq{awq_check=block}`).
With a margin (`awq_check_z=2`: scales kept only where they clearly help) SmolLM2 at g128 scored 16.40 (Zen 4,
2026-12-07), worse than `gptq` (16.34) and than the scales kept (16.13): no default either.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

FOLDS_ATTR = "optistack_awq_folds"


@dataclass
class AwqFold:
    block: str  # the decoder block's name in the model
    prev: str  # names relative to the block
    linears: list[str]
    s: Any  # the folded scale [in]
    rows: Any = None  # prev's output rows feeding the linears (None: all)


def undo(block: Any, folds: list[AwqFold]) -> None:
    """Folds each of `folds` back (by 1 / s) into fresh copies of the tensors it touches: the block's tensors may
    be shared with the model before the pass (copy-on-write), which must not change."""
    import torch

    from .awq_search import fold_scale

    for f in folds:
        prev, linears = block.get_submodule(f.prev), [block.get_submodule(n) for n in f.linears]
        for m in (prev, *linears):
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.nn.Parameter):
                    setattr(m, name, torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        fold_scale(prev, linears, 1.0 / f.s, f.rows)


def split_sequences(inputs: list) -> tuple[list, list]:
    """(fit, judge): the first half of each batch's sequences and the rest (batches of one sequence fit)."""
    from .awq_search import first_tensor, row_range

    fit, judge = [], []
    for inp in inputs:
        n = first_tensor(inp).shape[0]
        if n < 2:
            fit.append(inp)
            continue
        half = (n + 1) // 2
        fit.append(row_range(inp, 0, half))
        judge.append(row_range(inp, half, n))
    return fit, judge


def block_error(block: Any, chosen: list[str], fit: list, judge: list, refs: list,
                round_weight: Callable[[Any, Any], Any]) -> Any:
    """The output MSE of each `judge` sequence (a float64 vector) of `block` after its `chosen` linears are
    rounded (`round_weight(w, H)`, in place as float weights) with H from `fit`."""
    import torch

    from ..linears import weight_rows
    from .awq_search import output_of
    from .gptq_blocks import hessian_sums

    layers = {n: block.get_submodule(n) for n in chosen}
    sums = hessian_sums(layers, block, fit)
    for n, lin in layers.items():
        w = weight_rows(lin)
        w.copy_(round_weight(w.detach().float(), sums[n].hessian()).to(w.dtype))
    return torch.cat([(output_of(block, inp) - ref).double().pow(2).flatten(1).mean(1)
                      for inp, ref in zip(judge, refs)])


def keep_scales(block: Any, folds: list[AwqFold], chosen: list[str], inputs: list,
                round_weight: Callable[[Any, Any], Any], z: float = 0.0) -> bool | None:
    """Undoes the block's scales unless, GPTQ-rounded, it scores lower with them by more than `z` standard
    errors of the per-sequence difference (0: lower at all); returns whether they were kept (None: nothing to
    judge on, kept)."""
    from .awq_search import clearly_lower, output_of

    fit, judge = split_sequences(inputs)
    if not judge or not folds or not chosen:
        return None
    refs = [output_of(block, inp) for inp in judge]
    with_scales = copy.deepcopy(block)
    without = copy.deepcopy(block)
    undo(without, folds)
    err_with = block_error(with_scales, chosen, fit, judge, refs, round_weight)
    err_without = block_error(without, chosen, fit, judge, refs, round_weight)
    del with_scales, without
    if not clearly_lower(err_with, err_without, z):
        undo(block, folds)
        return False
    return True
