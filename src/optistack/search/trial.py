"""Running one trial in a process: the core runner, resumed from a cached prefix, under a timing lock.

A trial runs a pipeline without an accuracy budget (the search judges the budget from the numbers), so
every step with finite outputs is measured; the gate still refuses non-finite ones. The model each
applied prefix produces stays in memory (a small LRU): trial "a,b,c" after "a,b" resumes the same
`core.run.Runner` on the cached state and applies only "c", timed against the original in the same
interleaved A/B run as always; its report repeats the stored measurements of "a" and "b". Timing phases
run inside the lock's `timing()`, passed to the benchmark instrument as its constructor's `lock`.
"""
from __future__ import annotations

import contextlib
import datetime
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ContextManager

from ..bench.benchmark import BenchmarkInstrument
from ..bench.gate import GateInstrument
from ..core.deprecation import renamed, warn_deprecated
from ..core.instrument import RunState
from ..core.pass_protocol import MODULE, PassContext, pass_text
from ..core.run import Runner, device_of
from ..wiring import resolve_workload
from .store import TrialRecord


class NoLock:
    """One trial at a time in this process: nothing else runs while it times, so nothing to lock."""

    policy = "sequential: one trial at a time in one process, so timings never share the cores"

    def work(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def timing(self) -> ContextManager[None]:
        return contextlib.nullcontext()


_RENAMED = {"NoGate": "NoLock"}  # names from before the timing lock was called a lock: they warn


__getattr__ = renamed(__name__, _RENAMED, lambda new: globals()[new], " (a timing lock, not a gate)")


@dataclass
class _Baseline:
    report_fields: dict[str, Any]  # workload, machine, versions, git_commit, baseline, timing


@dataclass
class _Prefix:
    model: Any
    form: str
    steps: list[dict[str, Any]]


class _RememberPrefixes:
    """An instrument: after each applied step, the model so far is cached under the pipeline text so far."""

    def __init__(self, runner: "TrialRunner", done: list[str]) -> None:
        self.runner, self.texts = runner, list(done)

    def after_step(self, p: Any, step: Any, state: RunState) -> None:
        self.texts.append(step.text)
        if step.status == "applied":
            self.runner._remember(",".join(self.texts), state)


class TrialRunner:
    """Runs trials on one workload in this process; Ray workers each hold one.

    `lock` has `work()` (held for a whole trial) and `timing()` (held while timing); `NoLock` by default.
    """

    def __init__(self, workload: Any, timing: Any, lock: Any = None, cache_size: int = 8, name: str = "local",
                 *, gate: Any = None) -> None:
        if gate is not None:
            warn_deprecated("TrialRunner(gate=...)", "it is a timing lock; pass lock=...")
            lock = lock or gate
        self.workload = resolve_workload(workload)
        self.timing = timing
        self.lock = lock or NoLock()
        self.cache_size = cache_size
        self.name = name
        self._baseline: _Baseline | None = None
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()

    def run(self, text: str, phase: str = "") -> TrialRecord:
        started = time.perf_counter()
        try:
            with self.lock.work():
                record = self._run(text)
        except Exception as exc:  # a trial that cannot even start is a failed trial, not a failed search
            record = TrialRecord.failed(text, f"{type(exc).__name__}: {exc}".strip())
        record.seconds, record.worker, record.phase = time.perf_counter() - started, self.name, phase
        return record

    def _benchmark(self) -> BenchmarkInstrument:
        return BenchmarkInstrument(timing=self.timing, lock=self.lock.timing)

    def _state(self, report: Any, model: Any, form: str) -> RunState:
        wl = self.workload
        return RunState(workload=wl, original=wl.model, current=model, form=form,
                        ctx=PassContext(workload=wl, device=device_of(wl.model)), report=report)

    def _measure_baseline(self) -> _Baseline:
        from ..bench.report import Step
        from ..wiring import new_report

        report = new_report(self.workload, "", None)
        Runner([self._benchmark()], Step).start(self._state(report, self.workload.model, MODULE))
        fields = {"workload": report.workload, "machine": report.machine, "versions": report.versions,
                  "git_commit": report.git_commit, "baseline": report.baseline, "timing": report.timing}
        return _Baseline(fields)

    def _longest_prefix(self, texts: list[str]) -> tuple[int, _Prefix | None]:
        for n in range(len(texts) - 1, 0, -1):
            entry = self._prefixes.get(",".join(texts[:n]))
            if entry is not None:
                self._prefixes.move_to_end(",".join(texts[:n]))
                return n, entry
        return 0, None

    def _remember(self, key: str, state: RunState) -> None:
        steps = [s.to_dict() for s in state.report.steps]
        self._prefixes[key] = _Prefix(state.current, state.form, steps)
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
        done, prefix = self._longest_prefix(texts)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report = Report(pipeline=text, created=created, max_accuracy_drop=None, **self._baseline.report_fields)
        report.steps = [Step.from_dict(s) for s in prefix.steps] if prefix else []
        state = self._state(report, prefix.model if prefix else self.workload.model,
                            prefix.form if prefix else MODULE)
        instruments = [self._benchmark(), GateInstrument(None), _RememberPrefixes(self, texts[:done])]
        Runner(instruments, Step, stop_after_unapplied=True).run(passes[done:], state)
        return TrialRecord.from_report(text, report.to_dict(), reused_prefix=",".join(texts[:done]))
