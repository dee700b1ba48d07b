"""Running a pipeline on a workload: each pass gets a private copy, instruments measure and gate it.

The caller's model is never handed to a pass, so whatever a pass does (or however it fails), the
original stays intact; a rejected or failed step leaves the pipeline on the last good model.
"""
from __future__ import annotations

import copy
import datetime
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import OptistackError
from .instrument import RunState, notify
from .pass_protocol import MODULE, PassContext, config_of, form_after, pass_text


@dataclass
class RunResult:
    model: Any  # the last accepted model, callable like the original
    report: Any  # bench.report.Report
    original: Any  # the untouched original model
    pipeline: Any

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def save(self, path: Any) -> Any:
        """Write the optimized model (safetensors + manifest, no pickle); `optistack.load(path)` reads it."""
        from .persist import save_model

        return save_model(path, self.model, self.original, self.report.steps, self.report.workload)

    def __repr__(self) -> str:
        return f"<RunResult pipeline={str(self.pipeline)!r} final_speedup={self.report.final_speedup}>"


def device_of(model: Any) -> str:
    try:
        return str(next(model.parameters()).device.type)
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def private_copy(model: Any, form: str) -> Any:
    """A copy the pass may edit in place; compiled/exported forms are not edited, so they are shared."""
    if form != MODULE:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise OptistackError(f"cannot copy the model to protect it from the pass: {exc}") from exc


def run_step(p: Any, step: Any, state: RunState, instruments: Sequence[Any]) -> bool:
    """One step of a run: skip it (unavailable, or the model's form is not one it takes), or apply it to
    a private copy and let the instruments measure and gate it. True when applied: `state` then holds
    the new model and form. Any failure is recorded against the pass; the run goes on."""
    available = p.requirements()
    if not available:
        step.status, step.reason = "skipped", available.reason
    elif state.form not in p.takes:
        step.status = "skipped"
        step.reason = f"takes {' or '.join(sorted(p.takes))}, but the model is {state.form} (an earlier step did not apply)"
    if step.status == "skipped":
        notify(instruments, "pass_not_run", p, step, state)
        return False
    notify(instruments, "before_pass", p, step, state)
    try:
        model_in = private_copy(state.current, state.form)
        started = time.perf_counter()
        result = p.apply(model_in, state.ctx)
        step.apply_seconds = time.perf_counter() - started
        step.modified, step.info = result.modified, dict(result.info)
        notify(instruments, "after_pass", p, step, result.model, state)
    except Exception as exc:  # any failure is recorded against the pass; the run goes on
        step.status = "failed"
        step.reason = f"{type(exc).__name__}: {exc}".strip()
        notify(instruments, "pass_not_run", p, step, state)
        return False
    if step.status != "applied":
        return False
    state.current, state.form = result.model, form_after(p, state.form)
    return True


def run_pipeline(pipeline: Any, workload: Any, *, max_accuracy_drop: float | None = None,
                 timing: Any = None, instruments: Sequence[Any] | None = None, verbose: bool = True) -> RunResult:
    from ..bench.environment import git_commit, machine_info, package_versions
    from ..bench.instrument import BenchmarkInstrument
    from ..bench.progress import ProgressInstrument
    from ..bench.report import Report, Step
    from ..workloads import load

    if isinstance(workload, str):
        workload = load(workload)
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise OptistackError(f"max_accuracy_drop must be >= 0 (e.g. 0.01 for 1%); got {max_accuracy_drop!r}")
    if instruments is None:
        instruments = [BenchmarkInstrument(max_accuracy_drop=max_accuracy_drop, timing=timing)]
        if verbose:
            instruments.append(ProgressInstrument())
    instruments = list(instruments)

    report = Report(
        workload=workload.describe() | {"name": workload.name, "kind": workload.kind},
        pipeline=str(pipeline), machine=machine_info(), versions=package_versions(), baseline={},
        max_accuracy_drop=max_accuracy_drop, git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    ctx = PassContext(workload=workload, device=device_of(workload.model))
    state = RunState(workload=workload, original=workload.model, current=workload.model,
                     form=getattr(pipeline, "start_form", MODULE), ctx=ctx, report=report)
    notify(instruments, "before_pipeline", state)
    for p in pipeline.passes:
        step = Step(pass_name=p.name, config=config_of(p), text=pass_text(p))
        report.steps.append(step)
        run_step(p, step, state, instruments)
    notify(instruments, "after_pipeline", state)
    return RunResult(model=state.current, report=report, original=state.original, pipeline=pipeline)
