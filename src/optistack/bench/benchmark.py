"""The benchmark instrument: times each pass A/B against the model before it and scores its accuracy.

Per step: first call (compile time included) -> accuracy vs the original's -> interleaved timing of
original / previous / candidate, in short blocks of consecutive calls whose first call (right after a
switch of model) is reported apart -> peak memory, model bytes, workload extras. Timing stands on
`bench.ab_timing`: a fresh batch per call (never scored data), "original" timed as a deep copy of it,
and the run's A/A noise floor, measured before the pipeline, inside which a change reads "no
measurable change". It measures and never
judges: accepting or rejecting is the gate's (`bench.gate.GateInstrument`). A candidate whose outputs
are not finite is not measured further (the gate refuses it). Every timing phase runs inside
`lock()`, a context-manager factory the caller passes (a search serializes timings across trials).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager

from ..core.deprecation import warn_deprecated
from .ab_timing import caller, measure_noise_floor, timing_context
from .allocator import allocator_state, for_transforms, steady_allocator
from .gate import all_finite, score_keys
from .memory import model_bytes, peak_memory
from .report import Accuracy
from .stats import paired_speedup, verdict
from .timer import TimingConfig, interleaved, latency_summary, time_call


class BenchmarkInstrument:
    def __init__(self, max_accuracy_drop: float | None = None, timing: TimingConfig | None = None,
                 measure_extras: bool = True, lock: Callable[[], ContextManager[Any]] | None = None) -> None:
        if max_accuracy_drop is not None:
            warn_deprecated("BenchmarkInstrument(max_accuracy_drop=...)", "the budget belongs to the gate; "
                            "pass max_accuracy_drop to run()/optimize() or GateInstrument")
        self.max_accuracy_drop = max_accuracy_drop  # read by the wiring for the gate; not used here
        self.timing = timing or TimingConfig()
        self.measure_extras = measure_extras
        self.lock = lock or contextlib.nullcontext

    def _run(self, state: Any, model: Any):
        """One call of `model` on a fresh timing batch (made here, outside any timed call)."""
        from ..core.workload import run_on

        batch = timing_context(state, self.timing).batches()
        return lambda: run_on(state.workload, model, batch)

    @staticmethod
    def _accuracies(state: Any) -> tuple[dict[str, float], dict[str, float]]:
        """(original, current) scores, read from the report: the baseline, and the last applied step's."""
        original = score_keys((state.report.baseline or {}).get("accuracy") or {})
        for step in reversed(state.report.steps):
            if step.status == "applied" and step.accuracy is not None:
                return original, {step.accuracy.metric: step.accuracy.after, **step.accuracy.extra}
        return original, original

    def before_pipeline(self, state: Any) -> None:
        with self.lock():
            self._measure_baseline(state)

    def _measure_baseline(self, state: Any) -> None:
        wl, model, device = state.workload, state.original, state.ctx.device
        if self.timing.allocator == "steady":
            steady_allocator()  # before the first call, so the baseline's first call sees it too
        first_ms = time_call(self._run(state, model), device)
        accuracy = wl.evaluate(model)
        tc = timing_context(state, self.timing)
        noise = None
        if self.timing.noise_floor:
            noise, samples = measure_noise_floor(caller(wl, model), caller(wl, tc.reference), self.timing,
                                                 device, tc.batches)
            name = "reference"
            noise["reference"] = tc.reference_how
            tc.floor = noise["floor"]
        else:
            samples = interleaved({"original": caller(wl, model)}, self.timing, device, batches=tc.batches)
            name = "original"
        state.report.baseline = {
            "latency_ms": latency_summary(samples, name),
            "accuracy": {**accuracy, "metric": wl.metric.name, "higher_is_better": wl.metric.higher_is_better,
                         "scale": wl.metric.scale},
            "model_bytes": model_bytes(model),
            "peak_memory_bytes": peak_memory(self._run(state, model), device),
            "first_call_ms": first_ms,
            "extra": wl.extra_measurements(model) if self.measure_extras else {},
            "noise_floor": noise,
        }
        state.report.timing = {"warmup": self.timing.warmup, "min_rounds": self.timing.min_rounds,
                               "max_rounds": self.timing.max_rounds, "max_seconds": self.timing.max_seconds,
                               "target_half_width": self.timing.target_half_width,
                               "block": self.timing.block,
                               "method": (f"interleaved A/B in shuffled balanced orders, blocks of {self.timing.block} "
                                          "consecutive calls per model (the first, after a switch, reported apart), "
                                          "paired bootstrap"),
                               "batches": tc.batches.describe(), "reference": tc.reference_how,
                               "allocator": allocator_state(),
                               "noise_floor": tc.floor}
        state.scratch["samples"] = {"original": samples[name]}

    def before_pass(self, p: Any, step: Any, state: Any) -> None:
        for_transforms()  # the pass's temporaries go back to the OS (bench.allocator)

    def after_pass(self, p: Any, step: Any, candidate: Any, state: Any) -> None:
        wl, device, metric = state.workload, state.ctx.device, state.workload.metric
        if self.timing.allocator == "steady":
            steady_allocator()  # fixed again for the timing, as the baseline had it
        box: list[Any] = []
        first = self._run(state, candidate)  # not under the lock: it includes compilation, informational
        step.first_call_ms = time_call(lambda: box.append(first()), device)
        if not all_finite(box[0]):
            return  # nothing worth measuring; the gate refuses it
        original, current = self._accuracies(state)
        after = wl.evaluate(candidate)
        before_value = current[metric.name]
        after_value = float(after.get(metric.name, math.nan))
        drop_orig = metric.drop(original[metric.name], after_value)
        step.accuracy = Accuracy(
            metric=metric.name, before=before_value, after=after_value, higher_is_better=metric.higher_is_better,
            drop=metric.drop(before_value, after_value), drop_from_original=drop_orig,
            extra={k: float(v) for k, v in after.items() if k != metric.name},
        )
        if not math.isfinite(after_value):
            return  # the gate refuses it
        with self.lock():
            self._time(step, candidate, state)
            step.model_bytes = model_bytes(candidate)
            step.peak_memory_bytes = peak_memory(self._run(state, candidate), device)
            if self.measure_extras:
                step.extra = wl.extra_measurements(candidate)

    def _time(self, step: Any, candidate: Any, state: Any) -> None:
        """Interleaved original (its reference copy) / previous / candidate, in blocks, a fresh batch per call."""
        wl, tc = state.workload, timing_context(state, self.timing)
        fns = {"original": caller(wl, tc.reference)}
        if state.current is not state.original:
            fns["previous"] = caller(wl, state.current)
        fns["candidate"] = caller(wl, candidate)
        baseline = "previous" if "previous" in fns else "original"
        samples = interleaved(fns, self.timing, state.ctx.device, compare=(baseline, "candidate"),
                              batches=tc.batches, seed=len(state.report.steps))
        step.latency_ms = latency_summary(samples, "candidate")
        sp = paired_speedup(samples[baseline], samples["candidate"])
        step.speedup = sp.to_dict() | {"verdict": verdict(sp, tc.floor), "noise_floor": tc.floor}
        cumulative = paired_speedup(samples["original"], samples["candidate"])
        step.cumulative_speedup, step.cumulative_ci95 = cumulative.median, [cumulative.low, cumulative.high]
