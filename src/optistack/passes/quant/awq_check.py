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
group divided by s, the group's linears multiplied by it; undoing puts back the tensors before AWQ, which the
record also holds (`restore`, exact), or, where the block was edited since, folds 1 / s.

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


class Originals:
    """The tensors a fold touched as they were before AWQ, by "module.param" name relative to the block: the model
    AWQ was given holds them (its pass edits copies), so the record costs no memory while that model lives. Never
    written, and never copied with the model (a pass's deep copy of its input would otherwise copy the body)."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def __deepcopy__(self, memo: dict) -> "Originals":
        return self

    @classmethod
    def of(cls, block: Any, modules: list[str]) -> "Originals":
        import torch

        return cls({f"{rel}.{name}": t for rel in modules for name in ("weight", "bias")
                    if isinstance(t := getattr(block.get_submodule(rel), name, None), torch.Tensor)})


@dataclass
class AwqFold:
    block: str  # the decoder block's name in the model
    prev: str  # names relative to the block
    linears: list[str]
    s: Any  # the folded scale [in]
    rows: Any = None  # prev's output rows feeding the linears (None: all)
    originals: Originals | None = None  # prev's and the linears' tensors before AWQ (exact undo)


def _fresh(t: Any, like: Any) -> Any:
    import torch

    return torch.nn.Parameter(t.detach().clone().to(like.device), requires_grad=like.requires_grad)


def restore(block: Any, folds: list[AwqFold]) -> bool:
    """Puts back, bit for bit, the tensors the folds touched as they were before AWQ, where the record holds them
    and replaying the folds on them gives the block's tensors exactly (nothing edited them since); returns
    whether it did. Why: folding by 1 / s lands an ulp away from the original weights, and GPTQ's error feedback
    turns that into other codes (SmolLM2 at g128, scales undone: 16.27 against `gptq` alone's 16.19)."""
    import torch

    from .awq_search import fold_scale

    if not folds or any(f.originals is None for f in folds):
        return False
    before: dict[str, Any] = {}
    for f in folds:
        for key, t in f.originals.tensors.items():  # type: ignore[union-attr]
            before.setdefault(key, t)
    trial = copy.deepcopy(block)
    for key, t in before.items():
        rel, _, name = key.rpartition(".")
        now = getattr(trial.get_submodule(rel), name, None)
        if not isinstance(now, torch.nn.Parameter) or now.shape != t.shape or now.dtype != t.dtype:
            return False
        setattr(trial.get_submodule(rel), name, _fresh(t, now))
    with torch.no_grad():
        for f in folds:
            prev = trial.get_submodule(f.prev)
            fold_scale(prev, [trial.get_submodule(n) for n in f.linears], f.s.to(prev.weight.device), f.rows)
    for key in before:
        rel, _, name = key.rpartition(".")
        if not torch.equal(getattr(trial.get_submodule(rel), name), getattr(block.get_submodule(rel), name)):
            return False
    del trial
    for key, t in before.items():
        rel, _, name = key.rpartition(".")
        m = block.get_submodule(rel)
        setattr(m, name, _fresh(t, getattr(m, name)))
    return True


def undo(block: Any, folds: list[AwqFold]) -> None:
    """Takes the folds back: exactly from the tensors before AWQ where the record holds them (`restore`), else by
    folding 1 / s into fresh copies of the tensors it touches. Either way the block's tensors may be shared with
    the model before the pass (copy-on-write), which must not change."""
    import torch

    from .awq_search import fold_scale

    if restore(block, folds):
        return
    for f in folds:
        prev, linears = block.get_submodule(f.prev), [block.get_submodule(n) for n in f.linears]
        for m in (prev, *linears):
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.nn.Parameter):
                    setattr(m, name, torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        fold_scale(prev, linears, 1.0 / f.s.to(prev.weight.device), f.rows)


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
