"""What a workload is: a model, the batch it is timed on, and how its outputs are scored.

The instrument only talks to this protocol, so a new use case (a vision model, a reranker) is a new
workload, not a change to the benchmark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Protocol, runtime_checkable

# One call's inputs in the workload's calling convention: model(*args, **kwargs).
Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Metric:
    """The accuracy metric and its direction: never guessed, always declared.

    `scale` says how a drop is measured: "relative" (a fraction of the before value: cosine 1.0 ->
    0.99 is a drop of 0.01; perplexity 12.5 -> 12.625 is a drop of 0.01) or "absolute" (for metrics
    whose reference value is 0, like relative output error: 0 -> 0.01 is a drop of 0.01).
    """

    name: str
    higher_is_better: bool
    scale: Literal["relative", "absolute"] = "relative"

    def drop(self, before: float, after: float) -> float:
        """How much worse `after` is than `before` (positive = worse); inf when `after` is not finite."""
        if not math.isfinite(after):
            return math.inf
        worse_by = (before - after) if self.higher_is_better else (after - before)
        if self.scale == "relative" and before != 0:
            return worse_by / abs(before)
        return worse_by


@runtime_checkable
class Workload(Protocol):
    name: str
    kind: str  # "encoder" | "causal-lm" | "generic"
    model: Any  # the original, unoptimized model, in eval mode
    metric: Metric

    def run(self, model: Any) -> Any:
        """One timed call on the benchmark batch (no grad); returns the outputs."""

    def evaluate(self, model: Any) -> dict[str, float]:
        """Accuracy of `model`; must contain `metric.name`, may contain more (reported, not gated)."""

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """Up to `n` inputs for passes that calibrate; never the evaluation data."""

    def extra_measurements(self, model: Any) -> dict[str, float]:
        """Measurements beyond latency (e.g. generation TTFT, tokens/s); {} when none."""

    def describe(self) -> dict[str, Any]:
        """JSON facts for the report: model id, parameter count, batch shape, eval set size."""
