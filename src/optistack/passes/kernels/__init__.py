"""The `fuse-kernels` pass (fuse.py). The kernels themselves live in `optistack.kernels`.

`optistack.passes.kernels.<backend>` (cpu, cuda, triton, reference, modules, build) is the old home of
the kernels and still answers, with a DeprecationWarning, for code written against it.
"""
from __future__ import annotations

import importlib
import warnings

_MOVED = ("build", "cpu", "cuda", "modules", "reference", "triton")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"optistack.passes.kernels.{name} moved to optistack.kernels.{name}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(f"optistack.kernels.{name}")
    raise AttributeError(f"module 'optistack.passes.kernels' has no attribute {name!r}")
