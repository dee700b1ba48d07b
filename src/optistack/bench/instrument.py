"""Deprecated location: the benchmark instrument lives in `bench.benchmark`, the gate in `bench.gate`."""
from __future__ import annotations

import warnings

from .benchmark import BenchmarkInstrument  # noqa: F401
from .gate import all_finite  # noqa: F401

warnings.warn("optistack.bench.instrument is deprecated: import BenchmarkInstrument from "
              "optistack.bench.benchmark (and all_finite from optistack.bench.gate)", DeprecationWarning, stacklevel=2)
