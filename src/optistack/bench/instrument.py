"""Deprecated location: the benchmark instrument lives in `bench.benchmark`, the gate in `bench.gate`."""
from __future__ import annotations

from ..core.deprecation import warn_deprecated
from .benchmark import BenchmarkInstrument  # noqa: F401
from .gate import all_finite  # noqa: F401

warn_deprecated("optistack.bench.instrument", "import BenchmarkInstrument from optistack.bench.benchmark "
                "(and all_finite from optistack.bench.gate)", stacklevel=2)
