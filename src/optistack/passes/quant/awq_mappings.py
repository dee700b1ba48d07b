"""Which layers of a decoder block share an input, per architecture: the table AWQ works from.

A *group* is a set of linear layers reading one input, the module before them (`prev`) whose output
channels absorb the per-channel factor 1/s exactly (a norm's weight and bias, or output rows of a
linear layer), and the module whose output judges a candidate scale (`inspect`). `prev_rows` picks the
output rows of a fused `prev` that feed the group one to one (the v rows of a fused qkv projection,
the up half of a fused gate_up projection). A group with no `prev` is searched for clipping only: no
exact place to fold a scale exists in front of it (a GELU before GPT-2's and GPT-NeoX's MLP output).

`no_clip` names layers (or rows of fused layers) whose clipping range is never shrunk: q and k act
through the attention softmax, which the per-layer output error does not see.

Architectures are matched by `model.config.model_type`; a model without a known type is matched by
structure (the first entry whose modules are all present), so custom Llama-like modules still work.
Anything else is refused with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..linears import is_linear

Rows = Callable[[nn.Module, Any], torch.Tensor]  # (block, model config) -> row indices


@dataclass(frozen=True)
class GroupSpec:
    label: str
    linears: tuple[str, ...]  # relative to the block
    inspect: str
    prev: str | None = None
    prev_rows: Rows | None = None  # None: all of prev's output channels, in order


@dataclass(frozen=True)
class Mapping:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path from the model to the ModuleList of decoder blocks
    groups: tuple[GroupSpec, ...]
    no_clip: dict[str, Rows | None] = field(default_factory=dict)  # None: the whole layer
    requires: Callable[[Any], str | None] | None = None  # config -> why this model cannot be handled


def _rows(start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end)


def _fused_qkv(split: Callable[[nn.Linear, nn.Linear], tuple[int, int]], qkv: str, out: str,
               part: str) -> Rows:
    """Rows of a [q | k | v] projection: `split` gives (q width, kv width) from (qkv, out) layers."""
    def rows(block: nn.Module, _cfg: Any) -> torch.Tensor:
        fused = block.get_submodule(qkv)
        q, kv = split(fused, block.get_submodule(out))
        return _rows(q + kv, q + 2 * kv) if part == "v" else _rows(0, q + kv)
    return rows


def _q_kv(fused: nn.Linear, out: nn.Linear) -> tuple[int, int]:
    q = out.in_features
    return q, (fused.out_features - q) // 2


def _neox_rows(part: str) -> Rows:
    """GPT-NeoX's query_key_value is [heads, 3, head_size] interleaved: q, k, v of head h follow each other."""
    def rows(block: nn.Module, _cfg: Any) -> torch.Tensor:
        hd = int(block.attention.head_size)
        heads = block.attention.query_key_value.out_features // (3 * hd)
        base = torch.arange(heads)[:, None] * 3 * hd
        offsets = torch.arange(2 * hd, 3 * hd) if part == "v" else torch.arange(0, 2 * hd)
        return (base + offsets[None, :]).reshape(-1)
    return rows


def _up_half(path: str) -> Rows:
    def rows(block: nn.Module, _cfg: Any) -> torch.Tensor:
        n = block.get_submodule(path).out_features
        return _rows(n // 2, n)
    return rows


def _opt_requires(cfg: Any) -> str | None:
    if not getattr(cfg, "do_layer_norm_before", True):
        return "OPT with do_layer_norm_before=false (post-norm, e.g. opt-350m) has no norm in front of its projections"
    return None


_LLAMA = Mapping(
    "llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3"), "model.layers",
    (GroupSpec("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", "input_layernorm"),
     GroupSpec("o", ("self_attn.o_proj",), "self_attn.o_proj", "self_attn.v_proj"),
     GroupSpec("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "post_attention_layernorm"),
     GroupSpec("down", ("mlp.down_proj",), "mlp.down_proj", "mlp.up_proj")),
    {"self_attn.q_proj": None, "self_attn.k_proj": None},
)

_PHI3 = Mapping(
    "phi3", ("phi3",), "model.layers",
    (GroupSpec("qkv", ("self_attn.qkv_proj",), "self_attn", "input_layernorm"),
     GroupSpec("o", ("self_attn.o_proj",), "self_attn.o_proj", "self_attn.qkv_proj",
               _fused_qkv(_q_kv, "self_attn.qkv_proj", "self_attn.o_proj", "v")),
     GroupSpec("gate_up", ("mlp.gate_up_proj",), "mlp", "post_attention_layernorm"),
     GroupSpec("down", ("mlp.down_proj",), "mlp.down_proj", "mlp.gate_up_proj", _up_half("mlp.gate_up_proj"))),
    {"self_attn.qkv_proj": _fused_qkv(_q_kv, "self_attn.qkv_proj", "self_attn.o_proj", "qk")},
)

_GPT_NEOX = Mapping(
    "gpt_neox", ("gpt_neox",), "gpt_neox.layers",
    (GroupSpec("qkv", ("attention.query_key_value",), "attention", "input_layernorm"),
     GroupSpec("o", ("attention.dense",), "attention.dense", "attention.query_key_value", _neox_rows("v")),
     GroupSpec("fc", ("mlp.dense_h_to_4h",), "mlp", "post_attention_layernorm"),
     GroupSpec("down", ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h")),  # after a GELU: clipping only
    {"attention.query_key_value": _neox_rows("qk")},
)

_GPT2 = Mapping(
    "gpt2", ("gpt2",), "transformer.h",
    (GroupSpec("qkv", ("attn.c_attn",), "attn", "ln_1"),
     GroupSpec("o", ("attn.c_proj",), "attn.c_proj", "attn.c_attn",
               _fused_qkv(_q_kv, "attn.c_attn", "attn.c_proj", "v")),
     GroupSpec("fc", ("mlp.c_fc",), "mlp", "ln_2"),
     GroupSpec("down", ("mlp.c_proj",), "mlp.c_proj")),  # after a GELU: clipping only
    {"attn.c_attn": _fused_qkv(_q_kv, "attn.c_attn", "attn.c_proj", "qk")},
)

_OPT = Mapping(
    "opt", ("opt",), "model.decoder.layers",
    (GroupSpec("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn",
               "self_attn_layer_norm"),
     GroupSpec("o", ("self_attn.out_proj",), "self_attn.out_proj", "self_attn.v_proj"),
     GroupSpec("fc1", ("fc1",), "fc1", "final_layer_norm"),
     GroupSpec("fc2", ("fc2",), "fc2", "fc1")),  # relu(x / s) = relu(x) / s: exact for ReLU only (checked)
    {"self_attn.q_proj": None, "self_attn.k_proj": None},
    _opt_requires,
)

MAPPINGS = (_LLAMA, _PHI3, _GPT_NEOX, _GPT2, _OPT)
KNOWN = ", ".join(t for m in MAPPINGS for t in m.model_types)


@dataclass
class ResolvedGroup:
    """A GroupSpec applied to one block: modules instead of names; `prev` None for clip-only groups."""

    label: str
    linears: dict[str, nn.Linear]
    inspect: nn.Module
    prev: nn.Module | None
    prev_rows: torch.Tensor | None


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _is_relu(m: Any) -> bool:
    return isinstance(m, nn.ReLU) or type(m).__name__ in ("ReLU", "ReLUActivation")


def resolve_groups(mapping: Mapping, block: nn.Module, cfg: Any) -> list[ResolvedGroup]:
    """The block's groups as modules. A scaled group whose fold would not be exact here is kept for
    clipping only (v -> o under grouped-query attention, fc1 -> fc2 with an activation other than ReLU)."""
    out = []
    for g in mapping.groups:
        linears = {name: block.get_submodule(name) for name in g.linears}
        prev = None if g.prev is None else block.get_submodule(g.prev)
        rows = None if g.prev_rows is None or prev is None else g.prev_rows(block, cfg)
        width = next(iter(linears.values())).in_features
        if isinstance(prev, nn.Linear):
            n = prev.out_features if rows is None else rows.numel()
            if n != width:  # e.g. fewer v rows than o inputs (grouped-query attention)
                prev, rows = None, None
        if mapping.name == "opt" and g.label == "fc2" and not _is_relu(getattr(block, "activation_fn", None)):
            prev, rows = None, None
        out.append(ResolvedGroup(g.label, linears, block.get_submodule(g.inspect), prev, rows))
    return out


def structure_problem(mapping: Mapping, model: nn.Module) -> str | None:
    """Why `model` does not have `mapping`'s structure (None when it does)."""
    blocks = _get(model, mapping.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return f"it has no {mapping.blocks} (a ModuleList of decoder blocks)"
    why = mapping.requires(getattr(model, "config", None)) if mapping.requires else None
    if why:
        return why
    for i, block in enumerate(blocks):
        for g in mapping.groups:
            for name in g.linears:
                m = _get(block, name)
                if m is None:
                    return f"{mapping.blocks}[{i}] has no {name}"
                if not is_linear(m):
                    return f"{mapping.blocks}[{i}].{name} is a {type(m).__name__}, not a float nn.Linear or Conv1D"
            if _get(block, g.inspect) is None:
                return f"{mapping.blocks}[{i}] has no {g.inspect}"
            if g.prev is not None:
                prev = _get(block, g.prev)
                if prev is None:
                    return f"{mapping.blocks}[{i}] has no {g.prev}"
                if not is_linear(prev) and getattr(getattr(prev, "weight", None), "ndim", 0) != 1:
                    return f"{mapping.blocks}[{i}].{g.prev} has no per-channel weight to fold scales into"
    return None


def find_mapping(model: nn.Module) -> tuple[Mapping | None, str]:
    """(mapping, "") for a supported model, else (None, why not)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = [m for m in MAPPINGS if model_type in m.model_types]
    if known:
        problem = structure_problem(known[0], model)
        return (known[0], "") if problem is None else (None, f"{model_type} model, but {problem}")
    for m in MAPPINGS:
        if structure_problem(m, model) is None:
            return m, ""
    what = f"model_type {model_type!r}" if model_type else "no config.model_type"
    return None, (f"no AWQ mapping for this architecture ({type(model).__name__}, {what}); AWQ knows which layers "
                  f"share an input for: {KNOWN}")
