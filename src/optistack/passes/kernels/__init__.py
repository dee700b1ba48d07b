"""The `fuse-kernels` pass (fuse.py). The kernels themselves live in `optistack.kernels`.

`optistack.passes.kernels.<backend>` (cpu, cuda, triton, reference, modules, build) is the old home of
the kernels and still answers, with a DeprecationWarning, for code written against it.
"""
from __future__ import annotations

import importlib

from ...core.deprecation import renamed

_MOVED = {name: f"optistack.kernels.{name}" for name in ("build", "cpu", "cuda", "modules", "reference", "triton")}
__getattr__ = renamed(__name__, _MOVED, importlib.import_module)
