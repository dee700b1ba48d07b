"""Pass and workload lookup through package entry points (groups `optistack.passes` and
`optistack.workloads`), so built-in and third-party passes register exactly the same way and nothing
depends on import order. `register_pass` adds one at run time (notebooks, tests).
"""
from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from typing import Any

from .errors import OptistackError, UnknownPassError, WorkloadError, closest

PASS_GROUP = "optistack.passes"
WORKLOAD_GROUP = "optistack.workloads"

_runtime_passes: dict[str, type] = {}
_runtime_workloads: dict[str, Any] = {}


@lru_cache(maxsize=None)
def _entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def pass_names() -> list[str]:
    return sorted(set(_entry_points(PASS_GROUP)) | set(_runtime_passes))


def get_pass_class(name: str) -> type:
    """The class registered under `name`; the error lists valid names and the closest one."""
    if name in _runtime_passes:
        return _runtime_passes[name]
    eps = _entry_points(PASS_GROUP)
    if name not in eps:
        names = pass_names()
        raise UnknownPassError(
            f"unknown pass '{name}'{closest(name, names)}; registered passes: {', '.join(names)}"
        )
    try:
        cls = eps[name].load()
    except Exception as exc:  # a broken plugin must not take the whole registry down
        raise OptistackError(f"pass '{name}' is registered by {eps[name].value} but failed to load: {exc}") from exc
    if getattr(cls, "name", None) != name:
        raise OptistackError(f"entry point '{name}' points to {eps[name].value}, whose name is {getattr(cls, 'name', None)!r}")
    loaded: type = cls  # an entry point loads Any; its name was checked above
    return loaded


def make_pass(name: str, options: dict[str, Any] | None = None) -> Any:
    return get_pass_class(name)(**(options or {}))


def register_pass(cls: type) -> type:
    """Register a pass class at run time (usable as a decorator). Names must be unique."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise OptistackError(f"{cls!r} has no 'name' attribute; a pass needs a kebab-case name")
    if name in _entry_points(PASS_GROUP) or name in _runtime_passes and _runtime_passes[name] is not cls:
        raise OptistackError(f"a pass named '{name}' is already registered")
    _runtime_passes[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    _runtime_passes.pop(name, None)


def workload_names() -> list[str]:
    return sorted(set(_entry_points(WORKLOAD_GROUP)) | set(_runtime_workloads))


def get_workload_factory(name: str) -> Any:
    if name in _runtime_workloads:
        return _runtime_workloads[name]
    eps = _entry_points(WORKLOAD_GROUP)
    if name not in eps:
        names = workload_names()
        raise WorkloadError(f"unknown workload '{name}'{closest(name, names)}; available workloads: {', '.join(names)}")
    return eps[name].load()


def register_workload(name: str, factory: Any) -> None:
    _runtime_workloads[name] = factory
