"""How one step of a run ended, decided by the runner alone from what the pass and the instruments said.

Instruments never write a step's status. They measure, and one that refuses the candidate raises
`Reject(reason)` from `after_pass`; a pass that cannot apply to this workload raises
`errors.PreconditionError`; a pass that changed nothing returns `PassResult(modified=False)`. The runner
turns each of these into an `Outcome` and writes it on the step, once.
"""
from __future__ import annotations

import traceback as _traceback
from dataclasses import dataclass

APPLIED, REJECTED, SKIPPED, FAILED = "applied", "rejected", "skipped", "failed"
STATUSES = (APPLIED, REJECTED, SKIPPED, FAILED)
NOTHING_TO_CHANGE = "nothing to change"


class Reject(Exception):
    """Raised by an instrument's `after_pass` to refuse the candidate; the run keeps the previous model."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    """The verdict on one step: status, why (None when applied), and the traceback of a failure."""

    status: str
    reason: str | None = None
    traceback: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"outcome status must be one of {', '.join(STATUSES)}; got {self.status!r}")

    @property
    def applied(self) -> bool:
        return self.status == APPLIED

    @classmethod
    def failure(cls, exc: BaseException) -> "Outcome":
        """A failed step keeps the exception's type, message and traceback, so a report can debug it."""
        text = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(FAILED, f"{type(exc).__name__}: {exc}".strip(), text)

    def write_to(self, step: object) -> None:
        """Record the verdict on a report step (the only place a step's status is set during a run)."""
        step.status, step.reason = self.status, self.reason  # type: ignore[attr-defined]
        if self.traceback is not None:
            step.traceback = self.traceback  # type: ignore[attr-defined]
