"""optistack: composable model optimization passes, each one measured and accuracy-gated.

    import optistack as ost
    wl = ost.workloads.load("minilm")
    result = ost.Pipeline.parse("int8-dynamic,compile").run(wl, max_accuracy_drop=0.01)
    result.report
    result.save("out/"); model = ost.load_model("out/")   # a saved optimized model (not a workload)

Importing is lean: names below are resolved on first use, and nothing imports triton, onnx,
transformers or touches CUDA until a pass or workload needs it.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": ("optistack.core.pipeline", "Pipeline"),
    "PassResult": ("optistack.core.pass_protocol", "PassResult"),
    "PassContext": ("optistack.core.pass_protocol", "PassContext"),
    "ConfiguredPass": ("optistack.core.pass_protocol", "ConfiguredPass"),
    "PassConfig": ("optistack.core.config", "PassConfig"),
    "Availability": ("optistack.core.requirements", "Availability"),
    "register_pass": ("optistack.core.registry", "register_pass"),
    "pass_names": ("optistack.core.registry", "pass_names"),
    "get_pass_class": ("optistack.core.registry", "get_pass_class"),
    "Report": ("optistack.bench.report", "Report"),
    "GateInstrument": ("optistack.bench.gate", "GateInstrument"),
    "TimingConfig": ("optistack.bench.timer", "TimingConfig"),
    "RunResult": ("optistack.wiring", "RunResult"),
    "optimize": ("optistack.api", "optimize"),
    "list_passes": ("optistack.api", "list_passes"),
    "load_model": ("optistack.checkpoints.loadables", "load_model"),
    "OptistackError": ("optistack.core.errors", "OptistackError"),
    "PassConfigError": ("optistack.core.errors", "PassConfigError"),
    "PipelineParseError": ("optistack.core.errors", "PipelineParseError"),
    "UnknownPassError": ("optistack.core.errors", "UnknownPassError"),
    "WorkloadError": ("optistack.core.errors", "WorkloadError"),
    "SearchResult": ("optistack.search.result", "SearchResult"),
}
# `search` is a package whose module object is callable: `optistack.search(...)` runs a search.
_SUBMODULES = {"workloads", "passes", "bench", "core", "search"}

# old name -> new name: still works, warns on use (`ost.load` read like `ost.workloads.load`)
_DEPRECATED = {"load": "load_model"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["__version__"]


def _run_with_default_wiring(*args: Any, **kwargs: Any) -> Any:
    """Core's runner knows no workloads or instruments: the API layer's wiring supplies them."""
    from .wiring import run_pipeline

    return run_pipeline(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _DEPRECATED:
        from .core.deprecation import warn_deprecated

        new = _DEPRECATED[name]
        warn_deprecated(f"optistack.{name}", f"use optistack.{new} (it loads a saved optimized model; "
                        "optistack.workloads.load builds a workload)")
        return __getattr__(new)
    if name in _SUBMODULES:
        return importlib.import_module(f"optistack.{name}")
    raise AttributeError(f"module 'optistack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


def _expand_preset(name: str) -> str:
    from .presets import expand_preset

    return expand_preset(name)


# Core imports nothing above it: the layer above installs the defaults it calls (lean: no torch here).
from .core.pipeline import set_preset_expander as _set_preset_expander  # noqa: E402
from .core.run import set_default_wiring as _set_default_wiring  # noqa: E402

_set_default_wiring(_run_with_default_wiring)
_set_preset_expander(_expand_preset)
