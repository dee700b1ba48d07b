"""`optistack.load_model`: every class a saved folder may name is registered first, then core loads.

Core's load registry (`core.load_registry`) knows only torch's and transformers' plain layers; each
optistack class registers itself, with its spec's schema, when its module is imported. This layer,
above all of them, imports those modules before a folder is read (`REGISTERING`) and names the homes
older versions saved the classes under (`RENAMED`: an old name loads the class it names now, and
nothing is imported from the old path).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..core import load_registry

# The modules that register loadable classes (replacement layers, fused modules, runtime forms).
REGISTERING = (
    "optistack.layers.int4",
    "optistack.layers.int8",
    "optistack.layers.int8_embedding",
    "optistack.layers.fp8",
    "optistack.kernels.modules",
    "optistack.kernels.engine_linear",
    "optistack.passes.export.session",
    "optistack.passes.export.tensorrt",
    "optistack.passes.export.openvino",
)
# Class names manifests of earlier versions hold -> the class's name now.
RENAMED = {
    "optistack.passes.quant.int4:Int4Linear": "optistack.layers.int4:Int4Linear",
    "optistack.passes.quant.int4_linear:Int4Linear": "optistack.layers.int4:Int4Linear",
    "optistack.passes.quant.fp8:Fp8Linear": "optistack.layers.fp8:Fp8Linear",
    "optistack.passes.quant.head:Int8Linear": "optistack.layers.int8:Int8Linear",
    **{f"optistack.passes.kernels.modules:{name}": f"optistack.kernels.modules:{name}"
       for name in ("FusedRMSNorm", "FusedInt4Linear", "FusedGatedMLP")},
}


def register_loadables() -> None:
    """Import every registering module and name the old homes (cheap after the first call)."""
    for name in REGISTERING:
        importlib.import_module(name)
    for old, new in RENAMED.items():
        load_registry.register_renamed(old, new)


def load_model(path: str | Path, model: Any = None) -> Any:
    """Rebuild a model saved by `RunResult.save`; outputs are bit-identical to the saved model's.
    Anything wrong with the folder is one `LoadError`; see docs/saving-and-loading.md for what is trusted.
    An int8 head runs on optistack's C++ int8 kernel when it builds here, as it did when saved."""
    from ..core.loading import load_model as load_registered

    register_loadables()
    loaded = load_registered(path, model)
    _int8_heads_on_cpp(loaded)
    return loaded


def _int8_heads_on_cpp(model: Any) -> None:
    import torch

    from ..core.modeling import unwrap_compiled
    from ..layers.int8 import Int8Linear

    module = unwrap_compiled(model)
    if not isinstance(module, torch.nn.Module):
        return
    heads = [m for m in module.modules() if isinstance(m, Int8Linear) and m.kernel == "torch"]
    if heads:
        from ..passes.quant.head import int8_kernel

        if int8_kernel() == "cpu-cpp":
            for m in heads:
                m.use_kernel("cpu-cpp")
