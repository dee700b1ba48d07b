"""Old public names that still answer, with a warning naming the new one and the release that removes them.

Every deprecation of optistack warns with `OptistackDeprecationWarning` (a DeprecationWarning), so the
test suite can make the package's own deprecated names errors (pyproject's `filterwarnings`) while
third-party deprecations stay warnings, and a user can filter exactly ours.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

REMOVED_IN = "0.2.0"  # the release that removes every name deprecated so far


class OptistackDeprecationWarning(DeprecationWarning):
    """An optistack name or argument that still works and will be removed (the message says in which release)."""


def warn_deprecated(what: str, instead: str, removed_in: str = REMOVED_IN, stacklevel: int = 3) -> None:
    """Warn that `what` is deprecated (removed in optistack `removed_in`): `instead` says what to use.
    `stacklevel` 3 points at the caller of the function that calls this."""
    warnings.warn(f"{what} is deprecated and will be removed in optistack {removed_in}: {instead}",
                  OptistackDeprecationWarning, stacklevel=stacklevel)


def renamed(module: str, old_to_new: Mapping[str, str], resolve: Callable[[str], Any],
            why: str = "", removed_in: str = REMOVED_IN) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `module`: an old name warns and returns `resolve(new name)`;
    any other name is the usual AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            warn_deprecated(f"{module}.{name}", f"use {old_to_new[name]}{why}", removed_in)
            return resolve(old_to_new[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
