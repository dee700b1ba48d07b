"""The one rule for which layers a weight pass may rewrite, and swapping modules by name.

Every quantization and pruning pass picks its layers here, so `skip`, `min_features`, tied weights
and "nothing to change" mean the same everywhere.

A *linear layer* is an `nn.Linear` (weight [out, in]) or a transformers `Conv1D` (GPT-2, GPT-J
style: weight [in, out], `y = x W + b`), with a plain float weight. Left out: layers already
quantized (tensor-subclass weights) and MHA's out_proj, which `F.multi_head_attention_forward`
reads directly instead of calling. Passes that replace a layer turn a `Conv1D` into the equivalent
`nn.Linear` first (`as_linear`: the weight transposed once); in-place passes read it through
`weight_rows`, a [out, in] view of the same storage.

Tied weights: a layer whose weight is also used by a module that the pass does not rewrite (GPT-2's
and T5's lm_head share the token embedding) is left as it is, with the reason: a quantized private
copy would add memory, not save it. Chosen layers that share one weight among themselves are
rewritten once and the replacement is shared (`LinearPlan.aliases`).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import PassApplyError
from ..core.pass_protocol import PassResult


def conv1d_type() -> type | None:
    """transformers' Conv1D class when transformers is loaded (a model holding one has loaded it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def is_conv1d(m: Any) -> bool:
    cls = conv1d_type()
    return cls is not None and isinstance(m, cls)


def is_linear(m: Any) -> bool:
    """nn.Linear (not MHA's out_proj) or Conv1D with a plain floating-point weight."""
    import torch

    if isinstance(m, torch.nn.Linear):
        if isinstance(m, torch.nn.modules.linear.NonDynamicallyQuantizableLinear):
            return False
    elif not is_conv1d(m):
        return False
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor and w.is_floating_point() and w.ndim == 2


def features(m: Any) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    if is_conv1d(m):
        return int(m.weight.shape[0]), int(m.weight.shape[1])
    return int(m.in_features), int(m.out_features)


def weight_rows(m: Any) -> Any:
    """The weight as [out, in]: the parameter itself for nn.Linear, a transposed view for Conv1D
    (in-place edits of the view change the layer)."""
    return m.weight.t() if is_conv1d(m) else m.weight


def as_linear(m: Any) -> Any:
    """An nn.Linear computing what `m` computes: `m` itself, or a Conv1D's weight transposed once
    (the bias is shared, not copied)."""
    import torch

    if not is_conv1d(m):
        return m
    n_in, n_out = features(m)
    lin = torch.nn.Linear(n_in, n_out, bias=m.bias is not None, device="meta")
    w = m.weight
    lin.weight = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if m.bias is not None:
        lin.bias = m.bias
    return lin


@dataclass
class LinearPlan:
    """Which linear layers a pass rewrites, and why the others stay as they are."""

    layers: dict[str, Any]  # every linear layer, by module name
    chosen: list[str]  # rewrite these (one per distinct weight)
    skipped: list[str] = field(default_factory=list)  # by `skip` / `min_features`
    tied: dict[str, str] = field(default_factory=dict)  # name -> what else uses its weight
    aliases: dict[str, str] = field(default_factory=dict)  # name -> chosen name with the same weight
    skip: str = ""
    min_features: int = 1

    @property
    def conv1d(self) -> int:
        return sum(1 for n in self.chosen if is_conv1d(self.layers[n]))

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tied:
            out["linears_tied_left"] = len(self.tied)
            out["tied_reason"] = "; ".join(f"{n} shares its weight with {o}" for n, o in list(self.tied.items())[:3]) \
                + " (a quantized private copy would add memory, not save it)"
        if self.conv1d:
            out["conv1d_converted"] = self.conv1d
        return out

    def nothing_reason(self) -> str:
        """Why `chosen` is empty, for `PassResult.info["reason"]`."""
        if not self.layers:
            return ("nothing to change: the model has no nn.Linear or transformers Conv1D layer with float "
                    "weights (already quantized layers are not quantized again)")
        parts = []
        if self.skipped:
            small = f" or are smaller than min_features={self.min_features}" if self.min_features > 1 else ""
            parts.append(f"{len(self.skipped)} matched skip={self.skip!r}{small}")
        if self.tied:
            parts.append(f"{len(self.tied)} share their weight with another module "
                         f"({', '.join(f'{n} with {o}' for n, o in list(self.tied.items())[:2])})")
        return f"nothing to change: of {len(self.layers)} linear layers, " + "; ".join(parts)

    def unchanged(self, model: Any, info: dict[str, Any] | None = None) -> PassResult:
        """The honest result when nothing was chosen: the model as it is, with the reason."""
        return PassResult(model, modified=False, info={**(info or {}), **self.info(), "reason": self.nothing_reason()})


def find_linears(model: Any, skip: str = "", one_per_weight: bool = False) -> dict[str, Any]:
    """The one way to find linear layers (see the module docstring): by module name, less names in
    which the regex `skip` is found; `one_per_weight` keeps only the first of layers that share one
    weight (in-place passes then edit a tied weight once). {} when there is none."""
    pattern = re.compile(skip) if skip else None
    seen: set[int] = set()
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        if not is_linear(m) or (pattern is not None and pattern.search(name)):
            continue
        if one_per_weight:
            if id(m.weight) in seen:
                continue
            seen.add(id(m.weight))
        out[name] = m
    return out


def float_linears(model: Any, pass_name: str) -> dict[str, Any]:
    """Every linear layer (`find_linears`) of a torch module; a clear error naming the pass otherwise."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise PassApplyError(f"{pass_name}: expected a torch.nn.Module, got {type(model).__name__}")
    return find_linears(model)


def choose_linears(linears: dict[str, Any], skip: str, min_features: int = 1) -> tuple[list[str], list[str]]:
    """(names to rewrite, names left as they are): `skip` is a regex searched in module names, and
    layers smaller than `min_features` in either dimension stay as they are."""
    pattern = re.compile(skip) if skip else None
    chosen = [n for n, m in linears.items()
              if not (pattern and pattern.search(n)) and min(features(m)) >= min_features]
    return chosen, [n for n in linears if n not in chosen]


def plan_linears(model: Any, pass_name: str, skip: str = "", min_features: int = 1) -> LinearPlan:
    """The layers a replacing pass (quantization) rewrites: `choose_linears`, less tied weights."""
    layers = float_linears(model, pass_name)
    chosen, skipped = choose_linears(layers, skip, min_features)
    plan = LinearPlan(layers, [], skipped, skip=skip, min_features=min_features)
    users: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(pname)
    primary_of: dict[int, str] = {}
    for name in chosen:
        m = layers[name]
        sharers = [u for u in users.get(id(m.weight), []) if u != f"{name}.weight"]
        outside = [u for u in sharers if u.removesuffix(".weight") not in chosen
                   or type(layers[u.removesuffix(".weight")]) is not type(m)
                   or layers[u.removesuffix(".weight")].bias is not m.bias]
        if outside:
            plan.tied[name] = outside[0]
        elif id(m.weight) in primary_of:
            plan.aliases[name] = primary_of[id(m.weight)]
        else:
            primary_of[id(m.weight)] = name
            plan.chosen.append(name)
    return plan


def set_module(model: Any, name: str, new: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def replace_layers(model: Any, plan: LinearPlan, build: Any) -> dict[str, Any]:
    """Build every replacement first (`build(name, layer)`; a failure leaves the model untouched),
    then swap them in, aliases sharing their primary's replacement. Returns {name: replacement}."""
    new = {name: build(name, plan.layers[name]) for name in plan.chosen}
    for name, module in new.items():
        set_module(model, name, module)
    for alias, primary in plan.aliases.items():
        set_module(model, alias, new[primary])
    return new
