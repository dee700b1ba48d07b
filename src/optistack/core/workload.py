"""The workload contract, which the runner, the instruments and the workloads all speak: a model, the
batches it is timed on, and how its outputs are scored (the workloads themselves are in
`optistack.workloads`).

Timing batches (optional, but every bundled workload has them): `timing_batch(index)` returns the
index-th batch of an endless stream of distinct batches of one shape, never drawn from the data
`evaluate` scores, and `run(model, batch)` calls the model on it. The instrument gives each timed round
a fresh batch, so a model that caches outputs for repeated inputs gains nothing. A workload without
`timing_batch` is timed on its one `run(model)` batch, and the report says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Protocol, runtime_checkable

from .modeling import Inputs  # one call's inputs: model(*args, **kwargs)


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

    def run(self, model: Any, batch: Any = None) -> Any:
        """One call (no grad) on `batch` (from `timing_batch`), or on the default batch when None."""

    def evaluate(self, model: Any) -> dict[str, float]:
        """Accuracy of `model`; must contain `metric.name`, may contain more (reported, not gated)."""

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """Up to `n` inputs for passes that calibrate; never the evaluation data."""

    def extra_measurements(self, model: Any) -> dict[str, float]:
        """Measurements beyond latency (e.g. generation TTFT, tokens/s); {} when none."""

    def describe(self) -> dict[str, Any]:
        """JSON facts for the report: model id, parameter count, batch shape, eval set size."""


def timing_batch(workload: Any, index: int) -> Any:
    """The workload's index-th timing batch, or None when it has no timing stream (one batch only)."""
    make = getattr(workload, "timing_batch", None)
    return make(index) if callable(make) else None


def run_on(workload: Any, model: Any, batch: Any) -> Any:
    """`workload.run(model, batch)`, or `workload.run(model)` when there is no batch."""
    return workload.run(model) if batch is None else workload.run(model, batch)


def batch_digest(batch: Any) -> str:
    """A SHA-1 of every tensor's bytes, shape and dtype (and of other values' repr) inside `batch`."""
    import hashlib

    import torch

    h = hashlib.sha1()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in x:
                h.update(f"K{k!r}".encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                visit(v)
        else:
            h.update(f"V{x!r}".encode())

    visit(batch)
    return h.hexdigest()
