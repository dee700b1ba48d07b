"""The gate instrument: the accept/reject policy, always on, apart from the benchmark that measures.

A candidate is refused (`Reject`) when its outputs are not finite, when its accuracy score is not
finite, or when its accuracy drop from the original exceeds `max_accuracy_drop`. The gate reads the
accuracy the benchmark measured on the step; when no instrument measured it (a run with only a progress
instrument) and a budget is set, the gate scores the candidate itself. The runner puts the gate last.
"""
from __future__ import annotations

import math
from typing import Any

from ..core.errors import BudgetError
from ..core.outcome import Reject


def check_budget(max_accuracy_drop: Any, required: bool = False) -> float | None:
    """The one check of an accuracy budget: None (no budget, unless `required`) or a number >= 0, e.g. 0.01
    for 1%. Anything else is a `BudgetError`."""
    if max_accuracy_drop is None and not required:
        return None
    if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float)) \
            or not max_accuracy_drop >= 0:
        raise BudgetError(f"max_accuracy_drop must be a number >= 0 (e.g. 0.01 for 1%){'' if required else ' or None'}; "
                          f"got {max_accuracy_drop!r}")
    return float(max_accuracy_drop)


def within_budget(drop: float | None, max_accuracy_drop: float | None) -> bool:
    """The one budget rule: a finite drop from the original no larger than the budget (any drop without one).
    The gate rejects a step by it; search ranks stored trials by it."""
    if max_accuracy_drop is None:
        return True
    return drop is not None and math.isfinite(drop) and drop <= max_accuracy_drop


def all_finite(outputs: Any) -> bool:
    """True when every floating tensor inside `outputs` (tensors, tuples, dicts, ModelOutputs) is finite."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return not outputs.is_floating_point() or bool(torch.isfinite(outputs).all())
    if isinstance(outputs, dict):
        return all(all_finite(v) for v in outputs.values())
    if isinstance(outputs, (list, tuple)):
        return all(all_finite(v) for v in outputs)
    if hasattr(outputs, "to_tuple"):
        return all_finite(outputs.to_tuple())
    return True


def score_keys(accuracy: dict[str, Any]) -> dict[str, float]:
    """The scores in a baseline accuracy dict, without its description (metric, direction, scale)."""
    return {k: v for k, v in accuracy.items() if k not in ("metric", "higher_is_better", "scale")}


class GateInstrument:
    """Finite outputs and the accuracy budget; raises `Reject(reason)` from `after_pass`."""

    def __init__(self, max_accuracy_drop: float | None = None) -> None:
        self.max_accuracy_drop = check_budget(max_accuracy_drop)
        self._original_score: float | None = None

    def before_pipeline(self, state: Any) -> None:
        self._original_score = None

    def _original(self, state: Any) -> float:
        """The original's score: the benchmark's baseline when it ran, else measured here once."""
        metric = state.workload.metric
        baseline = ((state.report.baseline or {}).get("accuracy") or {}) if state.report is not None else {}
        if metric.name in baseline:
            return float(baseline[metric.name])
        if self._original_score is None:
            self._original_score = float(state.workload.evaluate(state.original).get(metric.name, math.nan))
        return self._original_score

    def after_pass(self, p: Any, step: Any, candidate: Any, state: Any) -> None:
        if not all_finite(state.workload.run(candidate)):
            raise Reject("outputs are no longer finite (NaN or inf); previous model kept")
        metric, acc = state.workload.metric, getattr(step, "accuracy", None)
        if acc is None and self.max_accuracy_drop is None:
            return
        if acc is not None:
            after, drop = acc.after, acc.drop_from_original
        else:  # nobody measured accuracy: score it here, since a budget was asked for
            after = float(state.workload.evaluate(candidate).get(metric.name, math.nan))
            drop = metric.drop(self._original(state), after)
        if not math.isfinite(after):
            raise Reject(f"{metric.name} is not finite after the pass; previous model kept")
        budget = self.max_accuracy_drop
        if not within_budget(drop, budget):
            raise Reject(f"{metric.name} drop {drop:.4g} from the original exceeds the budget "
                         f"max_accuracy_drop={budget:g}; previous model kept")
