"""Instruments watch every pass from outside (MLIR PassInstrumentation, TVM PassContext instruments).

Every hook is optional. `after_pass` measures a candidate and may refuse it by raising
`core.outcome.Reject(reason)`; it never writes the step's status: the runner decides (the pipeline then
keeps the model it had before the pass) and announces the verdict with `after_step`, for every step.
Benchmarking, gating and progress output are instruments; passes hold no timing code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from .pass_protocol import PassContext


@dataclass
class RunState:
    """What instruments may read during a run. `current` is the last accepted model."""

    workload: Any
    original: Any
    current: Any
    form: str
    ctx: PassContext
    report: Any  # the run's record (bench.report.Report from the default wiring), filled as the run goes
    scratch: dict[str, Any] = field(default_factory=dict)  # instrument-private state, keyed by instrument


class Instrument(Protocol):
    def before_pipeline(self, state: RunState) -> None: ...

    def before_pass(self, p: Any, step: Any, state: RunState) -> None: ...

    def after_pass(self, p: Any, step: Any, candidate: Any, state: RunState) -> None:
        """Measure `candidate`; raise `Reject(reason)` to refuse it."""

    def pass_not_run(self, p: Any, step: Any, state: RunState) -> None:
        """The step was skipped or failed (kept for instruments written before `after_step`)."""

    def after_step(self, p: Any, step: Any, state: RunState) -> None:
        """The runner's verdict is on `step` (status, reason): applied, rejected, skipped or failed."""

    def after_pipeline(self, state: RunState) -> None: ...


def notify(instruments: Sequence[Any], hook: str, *args: Any) -> None:
    for inst in instruments:
        fn = getattr(inst, hook, None)
        if fn is not None:
            fn(*args)
