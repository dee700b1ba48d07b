"""Modules built with their weights on the meta device, for a loader that assigns every saved tensor.

Why: `load_model` built the saved model's base for real, allocating and initializing every float weight
(a 1.1B Llama: 4.4 GB of random numbers drawn), and its replacement layers full of zeros, only for
`load_state_dict(assign=True)` to swap all of them for the file's tensors: loading a 0.87 GB int4 model
peaked at 5.0 GB and left ~0.6 GB of freed heap resident. transformers' own `from_pretrained` builds on
meta too and recomputes what no file holds (non-persistent buffers: rotary tables, position ids) with the
model's `_init_weights`; so does this, and it checks that each such buffer was written (a sentinel value
that must be gone). A module it cannot vouch for (a tensor attribute outside its parameters and buffers,
a buffer `_init_weights` leaves alone, a dtype with no sentinel) is reported, and the caller builds that
one for real, as before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def meta_tensor_attributes(module: torch.nn.Module) -> list[str]:
    """Names of tensors on the meta device that a module holds outside its parameters and buffers (one
    level into lists, tuples and dicts): assigning a state dict would leave them on meta."""
    found = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in items):
                found.append(f"{prefix}.{key}" if prefix else key)
    return found


def non_persistent(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(owner, name) of every non-persistent buffer under `module`: the ones a state dict does not hold."""
    return [(m, b) for _, m in module.named_modules()
            for b in sorted(m._non_persistent_buffers_set) if m._buffers.get(b) is not None]


def _sentinel(dtype: torch.dtype) -> float | int | None:
    if dtype.is_floating_point:
        return float("nan")
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return int(torch.iinfo(dtype).min)
    return None


def _buffer(m: torch.nn.Module, name: str) -> torch.Tensor:
    t = m._buffers[name]
    assert t is not None
    return t


def _written(t: torch.Tensor, sentinel: float | int) -> bool:
    return not bool((torch.isnan(t) if isinstance(sentinel, float) else t == sentinel).any())


def weightless_transformers(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module | None, str]:
    """(model, "") with every parameter and persistent buffer on meta and every non-persistent buffer
    real and computed by the model's own `_init_weights`; (None, why) where that cannot be vouched for."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception as exc:  # a class whose construction needs real tensors: the caller builds it for real
        return None, f"it does not build on the meta device ({type(exc).__name__}: {str(exc)[:120]})"
    stray = meta_tensor_attributes(model)
    if stray:
        return None, f"tensor attributes outside parameters and buffers ({', '.join(stray[:3])})"
    owners = non_persistent(model)
    init: Any = getattr(model, "_init_weights", None)
    if owners and not callable(init):
        return None, "non-persistent buffers and no _init_weights to compute them"
    filled: list[tuple[torch.nn.Module, str, float | int]] = []
    for m, name in owners:
        meta = m._buffers[name]
        assert meta is not None  # non_persistent lists only buffers that are set
        sentinel = _sentinel(meta.dtype)
        if sentinel is None:
            return None, f"a non-persistent {meta.dtype} buffer '{name}' (no sentinel to check it was computed)"
        m._buffers[name] = torch.full(meta.shape, sentinel, dtype=meta.dtype, device="cpu")
        filled.append((m, name, sentinel))
    try:
        with torch.no_grad():
            for m in {id(m): m for m, _ in owners}.values():
                init(m)  # its parameters are on meta: only the buffers change
    except Exception as exc:  # an _init_weights that needs real parameters
        return None, f"_init_weights fails on meta parameters ({type(exc).__name__}: {str(exc)[:120]})"
    missed = [name for m, name, sentinel in filled if not _written(_buffer(m, name), sentinel)]
    if missed:
        return None, f"_init_weights does not compute the non-persistent buffer(s) {', '.join(missed[:3])}"
    return model, ""


def weightless_replacement(meta_module: torch.nn.Module) -> bool:
    """Whether a replacement layer built on meta can be filled by assignment alone (no buffer the state
    dict lacks, no tensor attribute beside its parameters and buffers)."""
    return not non_persistent(meta_module) and not meta_tensor_attributes(meta_module)
