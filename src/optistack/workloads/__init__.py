"""Workloads: what a model is for (how to call it, on which inputs, how to score it).

Importing this package is cheap: the bundled workloads (and transformers) load only when asked for,
through the entry-point registry, so `optistack.workloads.load("minilm")` and third-party workloads
are found the same way.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import WorkloadError
from ..core.modeling import Inputs
from ..core.registry import get_workload_factory, workload_names
from ..core.workload import Metric, Workload

__all__ = ["GenericWorkload", "Inputs", "Metric", "Workload", "load", "names"]


_BUNDLED_FOLDERS = {"minilm": "minilm_dir", "smollm2": "smollm2_dir"}


def load(name: str, data: Any = None, task: str | None = None, **options: Any) -> Workload:
    """The workload for `name`: a registered workload name, a Hugging Face model folder, a .gguf file,
    or `module:factory` (see `workloads/from_path.py`), scored on `data` (a file or datasets folder,
    split into disjoint evaluation and calibration parts) when given; `task` overrides the task read
    from the folder's config.json. Anything unknown or unreadable raises one WorkloadError."""
    from .from_path import load_path, looks_like_path

    name = str(name)  # a pathlib.Path is welcome too
    if name in _BUNDLED_FOLDERS and (data is not None or task is not None):
        from .. import bundled_models  # the bundled model's own folder, with the user's data

        folder = getattr(bundled_models, _BUNDLED_FOLDERS[name])()
        return load_path(folder, data=data, task=task, name=name, **options)
    if name in workload_names() and not looks_like_path(name):
        if data is not None or task is not None:
            raise WorkloadError(f"workload '{name}' takes no data= or task=; they apply to model folders, .gguf "
                                f"files and module:factory (and to {', '.join(_BUNDLED_FOLDERS)})")
        return get_workload_factory(name)(**options)
    if looks_like_path(name):
        return load_path(name, data=data, task=task, **options)
    try:
        get_workload_factory(name)
    except WorkloadError as exc:
        raise WorkloadError(f"{exc}; or give a Hugging Face model folder, a .gguf file or module:factory") from None
    raise WorkloadError(f"unknown workload '{name}'")  # unreachable: the registry raised above


def names() -> list[str]:
    """Registered workload names (entry points plus run-time registrations)."""
    return workload_names()


def __getattr__(attr: str) -> Any:
    if attr == "GenericWorkload":  # lazy: keeps `import optistack.workloads` free of torch
        from .generic import GenericWorkload

        return GenericWorkload
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
