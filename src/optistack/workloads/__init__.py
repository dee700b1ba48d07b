"""Workloads: what a model is for (how to call it, on which inputs, how to score it).

Importing this package is cheap: the bundled workloads (and transformers) load only when asked for,
through the entry-point registry, so `optistack.workloads.load("minilm")` and third-party workloads
are found the same way.
"""
from __future__ import annotations

from typing import Any

from ..core.registry import get_workload_factory, workload_names
from .base import Inputs, Metric, Workload

__all__ = ["GenericWorkload", "Inputs", "Metric", "Workload", "load", "names"]


def load(name: str, **options: Any) -> Workload:
    """Build the workload registered as `name`; an unknown name raises WorkloadError listing valid ones."""
    return get_workload_factory(name)(**options)


def names() -> list[str]:
    """Registered workload names (entry points plus run-time registrations)."""
    return workload_names()


def __getattr__(attr: str) -> Any:
    if attr == "GenericWorkload":  # lazy: keeps `import optistack.workloads` free of torch
        from .generic import GenericWorkload

        return GenericWorkload
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
