"""One exception family, so callers can catch everything optistack raises with one `except`.

Messages name the pass/option at fault and what would be valid; that is the contract, not decoration.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class OptistackError(Exception):
    """Base class for every error optistack raises on purpose."""


class PassConfigError(OptistackError, ValueError):
    """A pass option has a bad name or value."""


class UnknownPassError(OptistackError, KeyError):
    """A pipeline names a pass that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PipelineParseError(OptistackError, ValueError):
    """Pipeline text is malformed, or two passes cannot follow each other."""


class BudgetError(OptistackError, ValueError):
    """`max_accuracy_drop` is not None or a number >= 0 (wherever it is given: run, optimize, search, the CLI,
    `GateInstrument`)."""


class WorkloadError(OptistackError, ValueError):
    """A workload is unknown, or its model/data cannot be loaded."""


class PassApplyError(OptistackError, RuntimeError):
    """A pass raised while transforming a model; the message names the pass."""


class LoadError(OptistackError):
    """`optistack.load_model` refused a saved folder: one line saying what is wrong and where (file / manifest key)."""


def closest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' when a valid name is close to `name`, else ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class PreconditionError(OptistackError):
    """A pass cannot apply to this workload or model (wrong kind, no layers it handles): the runner ends
    the step `skipped` with this message as the reason, not `failed`."""


NotApplicable = PreconditionError  # the same thing under the name a pass author may look for
