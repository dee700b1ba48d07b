"""The one run loop: each pass gets a private copy, instruments measure it, the runner decides.

The caller's model is never handed to a pass, so whatever a pass does (or however it fails), the
original stays intact; a rejected, skipped or failed step leaves the run on the last good model.
A pass that declares `copy_on_write = True` gets a copy that shares the tensors of the model before it
(`core.model_copy`: only what it replaces is new memory), checked after it by a `TensorGuard`; every
other pass gets a deep copy. Each step records the process's peak resident memory (`peak_rss_bytes`).
Instruments talk back only by raising `outcome.Reject` from `after_pass`; the runner alone writes a
step's status (see `core.outcome`). Core imports nothing above it: which workload a name means, which
instruments run by default and what the report holds are wired in by the API layer
(`optistack.wiring`), injected here with `set_default_wiring`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from typing import Any, Callable, Sequence

from .deprecation import warn_deprecated
from .errors import OptistackError, PassApplyError, PreconditionError
from .instrument import RunState, notify
from .model_copy import TensorGuard, peak_rss_bytes, shared_copy
from .modeling import device_type as device_of  # noqa: F401  (wiring and search import it from here)
from .outcome import APPLIED, FAILED, NOTHING_TO_CHANGE, REJECTED, SKIPPED, Outcome, Reject
from .pass_protocol import COMPILED, MODULE, config_of, form_after, pass_text


def private_copy(model: Any, form: str) -> Any:
    """A copy the pass may edit in place. Eager and compiled models are deep-copied (a compiled copy
    shares Dynamo's code cache, so it does not recompile); ONNX sessions and engines hold no editable
    weights and are shared."""
    if form not in (MODULE, COMPILED):
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise OptistackError(f"cannot copy the {form} model to protect it from the pass: {exc}") from exc


def pass_input(p: Any, model: Any, form: str) -> tuple[Any, TensorGuard | None]:
    """(the model `p` is applied to, the guard of the tensors it shares with `model`): a copy-on-write
    copy for a pass that declares `copy_on_write = True`, a deep copy (`private_copy`) for any other."""
    if form not in (MODULE, COMPILED) or getattr(p, "copy_on_write", False) is not True:
        return private_copy(model, form), None
    try:
        guard = TensorGuard(model, f"pass '{getattr(p, 'name', type(p).__name__)}'")
        return shared_copy(model), guard
    except Exception as exc:
        raise OptistackError(f"cannot copy the {form} model to protect it from the pass: {exc}") from exc


def check_guard(p: Any, guard: TensorGuard | None) -> None:
    """A copy-on-write pass that wrote into a tensor it shares with the model before it has broken its
    promise: a `PassApplyError` naming the tensors, so its result is discarded."""
    changed = guard.changed() if guard is not None else []
    if changed:
        names = ", ".join(changed[:3]) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
        raise PassApplyError(
            f"pass '{p.name}' declares copy_on_write but changed {len(changed)} tensor(s) it shares with the "
            f"model before it in place ({names}); its result is discarded. A pass that edits weights in place "
            "must not declare copy_on_write (it then gets a deep copy)")


def _not_run(p: Any, state: RunState) -> Outcome | None:
    available = p.requirements()
    if not available:
        return Outcome(SKIPPED, available.reason)
    if state.form not in p.takes:
        return Outcome(SKIPPED, f"takes {' or '.join(sorted(p.takes))}, but the model is {state.form} "
                                "(an earlier step did not apply)")
    return None


class WorkloadView:
    """The workload as a pass sees it: everything of the real one (calibration data, kind, name), but
    `model` is the pass's own private copy and nothing can be set, so no pass reaches the caller's
    model through `ctx.workload.model`."""

    def __init__(self, workload: Any, model: Any) -> None:
        object.__setattr__(self, "_workload", workload)
        object.__setattr__(self, "model", model)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_workload"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise OptistackError(f"a pass may not change the workload (tried to set workload.{name})")


def _versions(model: Any) -> tuple[int, ...] | None:
    """In-place edit counters of every tensor the model holds (None for non-modules): a cheap way to
    notice that something wrote into the caller's model."""
    if not hasattr(model, "named_parameters") or not hasattr(model, "named_buffers"):
        return None
    try:
        return tuple(t._version for _, t in (*model.named_parameters(), *model.named_buffers()))
    except Exception:
        return None


def jsonable(value: Any, depth: int = 0) -> Any:
    """A pass's `info` as JSON values: scalars kept, containers walked, anything else as its short repr,
    so one odd value cannot break `report.to_json()` after a whole run."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 4 and isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _attempt(p: Any, step: Any, state: RunState, instruments: Sequence[Any]) -> tuple[Outcome, Any]:
    """Apply `p` to a private copy and let the instruments measure it: (outcome, candidate)."""
    try:
        notify(instruments, "before_pass", p, step, state)
        model_in, guard = pass_input(p, state.current, state.form)
        ctx = dataclasses.replace(state.ctx, workload=WorkloadView(state.ctx.workload, model_in)) \
            if state.ctx.workload is not None else state.ctx
        started = time.perf_counter()
        try:
            with guard.protect() if guard is not None else contextlib.nullcontext():
                result = p.apply(model_in, ctx)
        finally:  # a broken promise outweighs whatever the pass raised
            check_guard(p, guard)
        step.apply_seconds = time.perf_counter() - started
        if not all(hasattr(result, a) for a in ("model", "modified", "info")):
            raise PassApplyError(f"pass '{p.name}': apply must return PassResult(model, modified, info); "
                                 f"it returned a {type(result).__name__}")
        step.modified, step.info = result.modified, jsonable(dict(result.info))
        if not result.modified and not getattr(p, "measure_unmodified", False):
            return Outcome(SKIPPED, str(result.info.get("reason") or NOTHING_TO_CHANGE)), None
        for inst in instruments:
            hook = getattr(inst, "after_pass", None)
            if hook is not None:
                hook(p, step, result.model, state)
            if getattr(step, "status", None) == REJECTED:  # an instrument written before `Reject` existed
                warn_deprecated(f"{type(inst).__name__}.after_pass setting step.status = 'rejected'",
                                "raise optistack.core.outcome.Reject(reason) instead", stacklevel=2)
                return Outcome(REJECTED, getattr(step, "reason", None) or "rejected by an instrument"), None
    except Reject as verdict:
        return Outcome(REJECTED, verdict.reason), None
    except PreconditionError as exc:  # the pass does not apply to this workload: a skip, not a failure
        return Outcome(SKIPPED, str(exc)), None
    except (Exception, SystemExit) as exc:  # any failure (a plugin's sys.exit too) is recorded against
        return Outcome.failure(exc), None   # the pass, with its traceback; the run goes on
    return Outcome(APPLIED), result.model


def run_step(p: Any, step: Any, state: RunState, instruments: Sequence[Any]) -> bool:
    """One step: skip it (unavailable, or the model's form is not one it takes), or apply it to a
    private copy and let the instruments measure it; the runner then writes the verdict on `step`.
    True when applied: `state` then holds the new model and form."""
    try:
        outcome = _not_run(p, state)
    except Exception as exc:  # a broken requirements() is the pass's failure, not the run's
        outcome = Outcome.failure(exc)
    candidate = None
    if outcome is None:
        before = _versions(state.original)
        outcome, candidate = _attempt(p, step, state, instruments)
        if before is not None and _versions(state.original) != before:
            outcome, candidate = Outcome(FAILED, (
                f"pass '{p.name}' wrote into the caller's original model in place (passes get a private "
                "copy; the original must not be touched); its result is discarded")), None
    outcome.write_to(step)
    if hasattr(step, "peak_rss_bytes"):
        step.peak_rss_bytes = peak_rss_bytes()
    if outcome.applied:
        state.current, state.form = candidate, form_after(p, state.form)
    elif outcome.status in (SKIPPED, FAILED):
        notify(instruments, "pass_not_run", p, step, state)
    notify(instruments, "after_step", p, step, state)
    return outcome.applied


class Runner:
    """Runs passes in order on a `RunState`: the only run loop (`Pipeline.run`, `optimize`, the search).

    `make_step(pass_name=, config=, text=)` makes the report's record of one step. With
    `stop_after_unapplied`, the passes after a step that did not apply are recorded as skipped (a
    search trial measures exactly the pipeline it names). `run` may resume a state whose report already
    holds earlier steps (a search's cached prefix): pass only the passes still to run.
    """

    def __init__(self, instruments: Sequence[Any], make_step: Callable[..., Any], *,
                 stop_after_unapplied: bool = False) -> None:
        self.instruments = list(instruments)
        self.make_step = make_step
        self.stop_after_unapplied = stop_after_unapplied

    def start(self, state: RunState) -> None:
        notify(self.instruments, "before_pipeline", state)

    def finish(self, state: RunState) -> None:
        notify(self.instruments, "after_pipeline", state)

    def _new_step(self, p: Any) -> Any:
        return self.make_step(pass_name=p.name, config=config_of(p), text=pass_text(p))

    def run(self, passes: Sequence[Any], state: RunState) -> None:
        passes = list(passes)
        for i, p in enumerate(passes):
            step = self._new_step(p)
            state.report.steps.append(step)
            if run_step(p, step, state, self.instruments) or not self.stop_after_unapplied:
                continue
            for rest in passes[i + 1:]:
                skipped = self._new_step(rest)
                Outcome(SKIPPED, f"not run: step '{step.text}' was {step.status}").write_to(skipped)
                state.report.steps.append(skipped)
            break

    def run_all(self, passes: Sequence[Any], state: RunState) -> None:
        self.start(state)
        self.run(passes, state)
        self.finish(state)


_default_wiring: Callable[..., Any] | None = None


def set_default_wiring(fn: Callable[..., Any]) -> None:
    """Called by the API layer: how `Pipeline.run` finds workloads, default instruments and the report."""
    global _default_wiring
    _default_wiring = fn


def run_pipeline(pipeline: Any, workload: Any, **options: Any) -> Any:
    """`pipeline` on `workload` with the default wiring (`optistack.wiring.run_pipeline`): a
    `wiring.RunResult`."""
    if _default_wiring is None:
        raise OptistackError("no run wiring installed: import optistack (the package sets it up)")
    return _default_wiring(pipeline, workload, **options)
