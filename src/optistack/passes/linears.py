"""Finding the nn.Linear layers a weight pass may rewrite, and swapping modules by name.

One definition for every quantization pass, so `skip` and `min_features` mean the same everywhere.
"""
from __future__ import annotations

import re
from typing import Any

from ..core.errors import PassApplyError


def float_linears(model: Any, pass_name: str) -> dict[str, Any]:
    """Every nn.Linear with a plain float weight, by module name; PassApplyError when there is none.

    Leaves out layers already quantized (tensor-subclass weights) and MHA's out_proj, which
    `F.multi_head_attention_forward` reads directly instead of calling.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise PassApplyError(f"{pass_name}: expected a torch.nn.Module, got {type(model).__name__}")
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)
             and not isinstance(m, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
             and type(m.weight.data) is torch.Tensor and m.weight.is_floating_point()}
    if not found:
        raise PassApplyError(f"{pass_name}: expected nn.Linear layers with float weights; the model has none")
    return found


def choose_linears(linears: dict[str, Any], skip: str, min_features: int = 1) -> tuple[list[str], list[str]]:
    """(names to rewrite, names left in float): `skip` is a regex searched in module names, and layers
    smaller than `min_features` in either dimension stay in float."""
    pattern = re.compile(skip) if skip else None
    chosen = [n for n, m in linears.items()
              if not (pattern and pattern.search(n)) and min(m.in_features, m.out_features) >= min_features]
    return chosen, [n for n in linears if n not in chosen]


def set_module(model: Any, name: str, new: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
