"""Accuracy-budgeted pipeline search: which passes, in which order, with which options, are fastest
while the accuracy drop stays within a budget.

    import optistack
    result = optistack.search("minilm",                     # a workload name or a workload object
                              candidates=["int8-dynamic", "compile", "onnx-export", "ort-optimize",
                                          "ort-quantize{per_channel=true|false}"],
                              max_accuracy_drop=0.01,       # the same budget `optistack run` gates on
                              objective="latency",          # "latency" | "throughput" | "size" | "ttft"
                              budget=20,                    # 20 trials in the store, or "10m" / "90s" of wall time
                              store="search.db")            # SQLite file: trials persist, a rerun resumes
    result                          # Jupyter: HTML summary + Pareto table
    result.pareto                   # the Pareto front (speed vs accuracy drop vs size): a table
    result.plot("pareto.png")       # PNG of every trial, front highlighted
    result.best_pipeline            # text `optistack run --pipeline` accepts unchanged (None if no trial within
                                    # the budget beat the original model)

Command line: `optistack search --model minilm --candidates "int8-dynamic,compile" --budget 20 --store search.db`.

A candidate is a pass in pipeline syntax; `a|b` in an unquoted option value lists choices to try and
`*` tries every choice a Literal/bool option allows (`ort-quantize{per_channel=*}`). The search tries
single passes first (greedy start), extends the best, then lets an Optuna sampler (TPE or grid) explore
ordered subsets that the model-form contract allows. See docs/search.md.
"""
from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["search", "SearchResult", "TrialStore", "TrialRecord"]

_LAZY = {"SearchResult": "result", "TrialStore": "store", "TrialRecord": "store"}


def search(*args: Any, **kwargs: Any) -> Any:
    """`optistack.search(workload, candidates=..., ...)`: see `optistack.search.driver.search`."""
    from .driver import search as run_search

    return run_search(*args, **kwargs)


search.__doc__ = __doc__


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """`optistack.search` is this package *and* the search function: calling the module searches,
    so `optistack.search(...)` works however the package was imported."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
