"""What "best" means: the objective's gain over the original, the accuracy budget, and the search budget.

Every objective is a gain (x-fold better than the original, higher is better) so trials compare alike:
latency = paired speedup; throughput = tokens/s ratio when the workload reports tokens/s, else the
speedup (items per second at a fixed batch); size = original bytes / model bytes; ttft = original
time to first token / new (generation workloads only).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..bench.gate import within_budget
from ..core.errors import OptistackError

OBJECTIVES = ("latency", "throughput", "size", "ttft")
FAILED_SCORE = -100.0  # a sampler's value for a trial that did not run to the end
INVALID_SCORE = -1000.0  # ... and for a sampled sequence the form contract refuses


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise OptistackError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    return objective


def _ratio(numerator: Any, denominator: Any) -> float | None:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (numerator, denominator))
    return float(numerator) / float(denominator) if ok else None


def gain(record: Any, objective: str) -> float | None:
    """How many times better than the original the trial's final model is; None when not measured."""
    if record.status != "ok":
        return None
    base = record.baseline
    if objective == "latency":
        return record.speedup
    if objective == "throughput":
        tps = _ratio(record.extra.get("tokens_per_s"), (base.get("extra") or {}).get("tokens_per_s"))
        return tps if tps is not None else record.speedup
    if objective == "size":
        return _ratio(base.get("model_bytes"), record.model_bytes)
    return _ratio((base.get("extra") or {}).get("ttft_ms"), record.extra.get("ttft_ms"))


def beats_original(record: Any, objective: str) -> bool:
    """Only a trial better than the original may be called best: under load a 0.78x int8 trial within the
    accuracy budget is still a loss. Rule: the objective's gain (the median for timed objectives) is above
    1.0, and when the gain is the paired speedup, its 95% CI is not entirely at or below 1.0."""
    value = gain(record, objective)
    if value is None or not value > 1.0:
        return False
    timed_by_speedup = objective == "latency" or (objective == "throughput" and value == record.speedup)
    if timed_by_speedup:  # the CI is the speedup's; other gains have none
        high = record.speedup_ci95[1] if record.speedup_ci95 else None
        if isinstance(high, (int, float)) and high <= 1.0:
            return False
    return True


def beats_rule(objective: str) -> str:
    """The `beats_original` rule in words, for the result summary."""
    if objective == "size":
        return "a model smaller than the original (size gain above 1.0x)"
    if objective == "ttft":
        return "a time-to-first-token gain above 1.0x"
    return f"a median {objective} gain above 1.0x, with a speedup 95% CI not entirely <= 1.0"


def meets_budget(record: Any, max_accuracy_drop: float) -> bool:
    """Every step within the budget: exactly what `optistack run --max-accuracy-drop` would accept."""
    return record.status == "ok" and within_budget(record.max_step_drop, max_accuracy_drop)


def score(record: Any, objective: str, max_accuracy_drop: float) -> float:
    """One number for the sampler, higher is better: any trial within budget beats any outside it."""
    value = gain(record, objective)
    if value is None:
        return FAILED_SCORE
    if meets_budget(record, max_accuracy_drop):
        return value
    drop = record.max_step_drop if record.max_step_drop is not None else math.inf
    over = drop / max_accuracy_drop if max_accuracy_drop > 0 else 1.0 + drop
    return -min(max(over, 1.0), 99.0)  # in [-99, -1]: closer to the budget is better


@dataclass(frozen=True)
class Budget:
    """Stop after `trials` trials of this space are in the store, or after `seconds` of wall time."""

    trials: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.trials} trials" if self.trials is not None else f"{self.seconds:g} s"


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(budget: Any) -> Budget:
    """`20` (trials) or `"90s"` / `"10m"` / `"1.5h"` (wall time of this call)."""
    if isinstance(budget, bool):
        budget = None
    if isinstance(budget, int):
        if budget < 1:
            raise OptistackError(f"budget must be >= 1 trial; got {budget}")
        return Budget(trials=budget)
    if isinstance(budget, str):
        text = budget.strip()
        if text.isdigit():
            return parse_budget(int(text))
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh])", text)
        if m and float(m.group(1)) > 0:
            return Budget(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    raise OptistackError(f"budget must be a number of trials (e.g. 20) or a wall time such as '90s', '10m' "
                         f"or '1h'; got {budget!r}")
