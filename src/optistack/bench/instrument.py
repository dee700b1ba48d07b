"""The benchmark instrument: times each pass A/B against the model before it, scores accuracy, gates.

Per step: first call (compile time included) -> finiteness check -> accuracy vs the original's ->
interleaved timing of original / previous / candidate -> peak memory, model bytes, workload extras.
A step over the accuracy budget, or with non-finite outputs, is marked `rejected`; the pipeline then
keeps the previous model.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..core.instrument import RunState
from .memory import model_bytes, peak_memory
from .report import Accuracy
from .stats import paired_speedup, summarize
from .timer import TimingConfig, interleaved, time_call


def all_finite(outputs: Any) -> bool:
    """True when every floating tensor inside `outputs` (tensors, tuples, dicts, ModelOutputs) is finite."""
    if isinstance(outputs, torch.Tensor):
        return not outputs.is_floating_point() or bool(torch.isfinite(outputs).all())
    if isinstance(outputs, dict):
        return all(all_finite(v) for v in outputs.values())
    if isinstance(outputs, (list, tuple)):
        return all(all_finite(v) for v in outputs)
    if hasattr(outputs, "to_tuple"):
        return all_finite(outputs.to_tuple())
    return True


class BenchmarkInstrument:
    def __init__(self, max_accuracy_drop: float | None = None, timing: TimingConfig | None = None,
                 measure_extras: bool = True) -> None:
        self.max_accuracy_drop = max_accuracy_drop
        self.timing = timing or TimingConfig()
        self.measure_extras = measure_extras
        self._original_accuracy: dict[str, float] = {}
        self._current_accuracy: dict[str, float] = {}

    def _run(self, state: RunState, model: Any):
        return lambda: state.workload.run(model)

    def before_pipeline(self, state: RunState) -> None:
        wl, model, device = state.workload, state.original, state.ctx.device
        first_ms = time_call(self._run(state, model), device)
        accuracy = wl.evaluate(model)
        self._original_accuracy = self._current_accuracy = dict(accuracy)
        samples = interleaved({"original": self._run(state, model)}, self.timing, device)["original"]
        state.report.baseline = {
            "latency_ms": summarize(samples).to_dict(),
            "accuracy": {**accuracy, "metric": wl.metric.name, "higher_is_better": wl.metric.higher_is_better,
                         "scale": wl.metric.scale},
            "model_bytes": model_bytes(model),
            "peak_memory_bytes": peak_memory(self._run(state, model), device),
            "first_call_ms": first_ms,
            "extra": wl.extra_measurements(model) if self.measure_extras else {},
        }
        state.report.timing = {"warmup": self.timing.warmup, "min_rounds": self.timing.min_rounds,
                               "max_rounds": self.timing.max_rounds, "method": "interleaved A/B, paired bootstrap"}
        state.scratch["samples"] = {"original": samples}

    def after_pass(self, p: Any, step: Any, candidate: Any, state: RunState) -> None:
        wl, device, metric = state.workload, state.ctx.device, state.workload.metric
        box: list[Any] = []
        step.first_call_ms = time_call(lambda: box.append(wl.run(candidate)), device)
        outputs = box[0]
        if not all_finite(outputs):
            step.status, step.reason = "rejected", "outputs are no longer finite (NaN or inf); previous model kept"
            return
        after = wl.evaluate(candidate)
        before_value = self._current_accuracy[metric.name]
        after_value = float(after.get(metric.name, math.nan))
        drop_orig = metric.drop(self._original_accuracy[metric.name], after_value)
        step.accuracy = Accuracy(
            metric=metric.name, before=before_value, after=after_value, higher_is_better=metric.higher_is_better,
            drop=metric.drop(before_value, after_value), drop_from_original=drop_orig,
            extra={k: float(v) for k, v in after.items() if k != metric.name},
        )
        if not math.isfinite(after_value):
            step.status, step.reason = "rejected", f"{metric.name} is not finite after the pass; previous model kept"
            return
        self._time(step, candidate, state)
        step.model_bytes = model_bytes(candidate)
        step.peak_memory_bytes = peak_memory(self._run(state, candidate), device)
        if self.measure_extras:
            step.extra = wl.extra_measurements(candidate)
        budget = self.max_accuracy_drop
        if budget is not None and drop_orig > budget:
            step.status = "rejected"
            step.reason = (f"{metric.name} drop {drop_orig:.4g} from the original exceeds the budget "
                           f"max_accuracy_drop={budget:g}; previous model kept")
            return
        self._current_accuracy = dict(after)

    def _time(self, step: Any, candidate: Any, state: RunState) -> None:
        fns = {"original": self._run(state, state.original)}
        if state.current is not state.original:
            fns["previous"] = self._run(state, state.current)
        fns["candidate"] = self._run(state, candidate)
        baseline = "previous" if "previous" in fns else "original"
        samples = interleaved(fns, self.timing, state.ctx.device, compare=(baseline, "candidate"))
        step.latency_ms = summarize(samples["candidate"]).to_dict()
        step.speedup = paired_speedup(samples[baseline], samples["candidate"]).to_dict()
        cumulative = paired_speedup(samples["original"], samples["candidate"])
        step.cumulative_speedup, step.cumulative_ci95 = cumulative.median, [cumulative.low, cumulative.high]
