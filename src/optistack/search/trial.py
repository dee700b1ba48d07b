"""Running one trial in a process: the benchmark instrument under a timing gate, and a prefix cache.

A trial runs a pipeline without an accuracy gate (the search judges the budget from the numbers), so
every step is measured. The model each applied prefix produces stays in memory (a small LRU): trial
"a,b,c" after "a,b" applies only "c", timed against the original in the same interleaved A/B run as
always, and its report repeats the stored measurements of "a" and "b".
"""
from __future__ import annotations

import contextlib
import datetime
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ContextManager

from ..bench.instrument import BenchmarkInstrument
from ..core.instrument import RunState
from ..core.pass_protocol import MODULE, PassContext, config_of, pass_text
from ..core.run import device_of, run_step
from .store import TrialRecord

_ACCURACY_KEYS = ("metric", "higher_is_better", "scale")


class NoGate:
    """One trial at a time in this process: nothing else runs while it times, so nothing to lock."""

    policy = "sequential: one trial at a time in one process, so timings never share the cores"

    def work(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def timing(self) -> ContextManager[None]:
        return contextlib.nullcontext()


def resolve_workload(spec: Any) -> Any:
    """A workload from its name, itself, or a picklable zero-argument factory."""
    from ..core.errors import WorkloadError
    from ..workloads import load

    if isinstance(spec, str):
        return load(spec)
    if all(hasattr(spec, attr) for attr in ("run", "evaluate", "model")):
        return spec
    if callable(spec):
        return resolve_workload(spec())
    raise WorkloadError(f"search needs a workload name, a workload object or a factory returning one; "
                        f"got {type(spec).__name__}")


class GatedBenchmark(BenchmarkInstrument):
    """The benchmark instrument, no accuracy gate, with every timing phase inside `gate.timing()`."""

    def __init__(self, gate: Any, timing: Any, accuracy: tuple[dict, dict] | None = None) -> None:
        super().__init__(max_accuracy_drop=None, timing=timing, measure_extras=False)
        self.gate = gate
        if accuracy is not None:  # resuming after a cached prefix: original and current scores
            self._original_accuracy, self._current_accuracy = dict(accuracy[0]), dict(accuracy[1])

    def before_pipeline(self, state: RunState) -> None:
        with self.gate.timing():
            self.measure_extras = True
            try:
                super().before_pipeline(state)
            finally:
                self.measure_extras = False

    def _time(self, step: Any, candidate: Any, state: RunState) -> None:
        with self.gate.timing():
            super()._time(step, candidate, state)

    def after_pass(self, p: Any, step: Any, candidate: Any, state: RunState) -> None:
        super().after_pass(p, step, candidate, state)
        if step.status == "applied" and step.latency_ms is not None:
            with self.gate.timing():  # workload extras (TTFT, tokens/s) are timings too
                step.extra = state.workload.extra_measurements(candidate)


@dataclass
class _Baseline:
    report_fields: dict[str, Any]  # workload, machine, versions, git_commit, baseline, timing
    accuracy: dict[str, float]


@dataclass
class _Prefix:
    model: Any
    form: str
    steps: list[dict[str, Any]]
    accuracy: dict[str, float]


class TrialRunner:
    """Runs trials on one workload in this process; Ray workers each hold one."""

    def __init__(self, workload: Any, timing: Any, gate: Any = None, cache_size: int = 8, name: str = "local") -> None:
        self.workload = resolve_workload(workload)
        self.timing = timing
        self.gate = gate or NoGate()
        self.cache_size = cache_size
        self.name = name
        self._baseline: _Baseline | None = None
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()

    def run(self, text: str, phase: str = "") -> TrialRecord:
        started = time.perf_counter()
        try:
            with self.gate.work():
                record = self._run(text)
        except Exception as exc:  # a trial that cannot even start is a failed trial, not a failed search
            record = TrialRecord.failed(text, f"{type(exc).__name__}: {exc}".strip())
        record.seconds, record.worker, record.phase = time.perf_counter() - started, self.name, phase
        return record

    def _measure_baseline(self) -> _Baseline:
        from ..bench.environment import git_commit, machine_info, package_versions
        from ..bench.report import Report

        wl = self.workload
        report = Report(workload=wl.describe() | {"name": wl.name, "kind": wl.kind}, pipeline="",
                        machine=machine_info(), versions=package_versions(), baseline={}, git_commit=git_commit())
        state = RunState(workload=wl, original=wl.model, current=wl.model, form=MODULE,
                         ctx=PassContext(workload=wl, device=device_of(wl.model)), report=report)
        GatedBenchmark(self.gate, self.timing).before_pipeline(state)
        accuracy = {k: v for k, v in report.baseline["accuracy"].items() if k not in _ACCURACY_KEYS}
        fields = {"workload": report.workload, "machine": report.machine, "versions": report.versions,
                  "git_commit": report.git_commit, "baseline": report.baseline, "timing": report.timing}
        return _Baseline(fields, accuracy)

    def _longest_prefix(self, texts: list[str]) -> tuple[int, _Prefix | None]:
        for n in range(len(texts) - 1, 0, -1):
            entry = self._prefixes.get(",".join(texts[:n]))
            if entry is not None:
                self._prefixes.move_to_end(",".join(texts[:n]))
                return n, entry
        return 0, None

    def _remember(self, key: str, state: RunState, accuracy: dict[str, float]) -> None:
        steps = [s.to_dict() for s in state.report.steps]
        self._prefixes[key] = _Prefix(state.current, state.form, steps, accuracy)
        self._prefixes.move_to_end(key)
        while len(self._prefixes) > self.cache_size:
            self._prefixes.popitem(last=False)

    def _run(self, text: str) -> TrialRecord:
        from ..bench.report import Report, Step
        from ..core.pipeline import Pipeline

        passes = Pipeline.parse(text).passes
        texts = [pass_text(p) for p in passes]
        if self._baseline is None:
            self._baseline = self._measure_baseline()
        base, wl = self._baseline, self.workload
        done, prefix = self._longest_prefix(texts)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report = Report(pipeline=text, created=created, max_accuracy_drop=None, **base.report_fields)
        report.steps = [Step.from_dict(s) for s in prefix.steps] if prefix else []
        accuracy = prefix.accuracy if prefix else base.accuracy
        state = RunState(workload=wl, original=wl.model, current=prefix.model if prefix else wl.model,
                         form=prefix.form if prefix else MODULE,
                         ctx=PassContext(workload=wl, device=device_of(wl.model)), report=report)
        bench = GatedBenchmark(self.gate, self.timing, (base.accuracy, accuracy))
        for i in range(done, len(passes)):
            step = Step(pass_name=passes[i].name, config=config_of(passes[i]), text=texts[i])
            report.steps.append(step)
            if not run_step(passes[i], step, state, [bench]):
                for p, t in zip(passes[i + 1:], texts[i + 1:]):
                    report.steps.append(Step(pass_name=p.name, config=config_of(p), text=t, status="skipped",
                                             reason=f"not run: step '{texts[i]}' was {step.status}"))
                break
            accuracy = {step.accuracy.metric: step.accuracy.after, **step.accuracy.extra}
            self._remember(",".join(texts[: i + 1]), state, accuracy)
        return TrialRecord.from_report(text, report.to_dict(), reused_prefix=",".join(texts[:done]))
