"""Old public names that still answer, with a DeprecationWarning naming the new one."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping


def renamed(module: str, old_to_new: Mapping[str, str], resolve: Callable[[str], Any],
            why: str = "") -> Callable[[str], Any]:
    """A module-level `__getattr__` for `module`: an old name warns and returns `resolve(new name)`;
    any other name is the usual AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            warnings.warn(f"{module}.{name} is deprecated: use {old_to_new[name]}{why}", DeprecationWarning,
                          stacklevel=2)
            return resolve(old_to_new[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
