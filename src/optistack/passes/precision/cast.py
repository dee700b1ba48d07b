"""`cast`: run a model in bf16 or fp16 while callers keep passing and receiving float32.

Two modes:

- `weights` (default): floating-point parameters and buffers are converted to `dtype` (integer
  buffers such as HF `position_ids` are left alone). A forward pre-hook on the root module casts
  floating-point input tensors to `dtype`, and a forward hook casts low-precision floating outputs
  back to float32, walking tuples, lists, dicts and HF `ModelOutput`s. Halves the weight memory;
  bf16 matmuls are fast on CPUs with AVX512-BF16/AMX (MiniLM eager ~1.8x fp32 on the reference CPU).
- `autocast`: weights stay float32; the root module's forward runs under
  `torch.autocast(device_type, dtype)` (entered by a pre-hook, left by an `always_call` forward hook,
  so it is left even when forward raises), and floating outputs are cast back to float32.

Hooks rather than a wrapper module keep the model's own class, so `model.config`, `.generate()`,
`save_pretrained()` and the calling convention all still work. The hooks are module-level
functions bound with `functools.partial`, so the model still deep-copies and pickles.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Literal

from ...core.config import PassConfig
from ...core.errors import PassApplyError
from ...core.load_registry import register_reapply
from ...core.modeling import device_type
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult

_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class CastConfig(PassConfig):
    dtype: Literal["bf16", "fp16"] = "bf16"
    mode: Literal["weights", "autocast"] = "weights"


def _map_tensors(obj: Any, fn: Any, inplace: bool = False) -> Any:
    """Apply `fn` to every tensor inside `obj` (tensors, tuples, lists, dicts, ModelOutputs).

    Dicts are shallow-copied (the caller's inputs are never mutated) unless `inplace`, which is used
    for outputs so an HF `ModelOutput` keeps its class and attributes. Other objects (e.g. an HF
    `Cache`) are returned untouched.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = obj if inplace else dict(obj) if type(obj) is dict else copy.copy(obj)  # dict(): dynamo-friendly
        for key in list(obj.keys()):
            new = _map_tensors(obj[key], fn, inplace)
            if new is not obj[key]:
                out[key] = new  # ModelOutput.__setitem__ keeps the attribute in sync
        return out
    if isinstance(obj, tuple):
        items = [_map_tensors(x, fn, inplace) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_map_tensors(x, fn, inplace) for x in obj]
    return obj


def _to_dtype(dtype: Any, t: Any) -> Any:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _to_fp32(t: Any) -> Any:
    import torch

    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _cast_inputs(dtype: Any, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    fn = functools.partial(_to_dtype, dtype)
    return _map_tensors(tuple(args), fn), _map_tensors(kwargs, fn)


def _outputs_to_fp32(module: Any, args: tuple, output: Any) -> Any:
    return _map_tensors(output, _to_fp32, inplace=True)


class _AutocastState:
    """Holds the autocast settings and the contexts entered by the pre-hook (a stack: re-entrant)."""

    def __init__(self, device_type: str, dtype: Any) -> None:
        self.device_type = device_type
        self.dtype = dtype
        self.active: list[Any] = []

    def __deepcopy__(self, memo: dict) -> "_AutocastState":
        return _AutocastState(self.device_type, self.dtype)

    def __getstate__(self) -> dict:
        return {"device_type": self.device_type, "dtype": self.dtype, "active": []}


def _enter_autocast_impl(state: _AutocastState, module: Any, args: tuple) -> None:
    import torch

    ctx = torch.autocast(device_type=state.device_type, dtype=state.dtype)
    ctx.__enter__()
    state.active.append(ctx)


def _exit_autocast_impl(state: _AutocastState, module: Any, args: tuple, output: Any) -> Any:
    if state.active:
        state.active.pop().__exit__(None, None, None)
    return _map_tensors(output, _to_fp32, inplace=True)


def __getattr__(name: str) -> Any:
    """`_enter_autocast`/`_exit_autocast`: the hooks above, hidden from TorchDynamo.

    Dynamo cannot trace an autocast context entered in one hook and left in another, so a later
    `compile` runs these two hooks eagerly and compiles the forward under the autocast they set.
    Built on first use (torch.compiler.disable imports dynamo, too slow for import time) and
    published as module attributes under their own names, so models holding them still pickle.
    """
    if name in ("_enter_autocast", "_exit_autocast"):
        import torch

        fn = torch.compiler.disable(globals()[name + "_impl"])
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = __name__
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_OUR_HOOKS = (_cast_inputs, _outputs_to_fp32, _enter_autocast_impl, _exit_autocast_impl)


def _remove_our_hooks(module: Any) -> int:
    """Drop hooks an earlier `cast` put on this module, so casting twice does not stack them."""
    removed = 0
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in list(hooks.items()):
            func = getattr(hook, "func", hook)
            if getattr(func, "__wrapped__", func) in _OUR_HOOKS:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


class CastPass(ConfiguredPass):
    """Convert weights to bf16/fp16 (`mode=weights`) or run under autocast (`mode=autocast`).

    The result is called exactly like the original and returns float32 floating outputs.
    """

    name = "cast"
    Config = CastConfig
    takes = frozenset({MODULE})
    reapply_on_load = True  # its hooks are not tensors: they are registered again on load
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"cast: expected a torch.nn.Module, got {type(model).__name__}")
        dtype = getattr(torch, _DTYPES[self.config.dtype])
        floating = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        if not floating:
            raise PassApplyError("cast: the model has no floating-point parameters or buffers to cast")
        _remove_our_hooks(model)
        info: dict[str, Any] = {"dtype": self.config.dtype, "mode": self.config.mode}
        if self.config.mode == "weights":
            model.to(dtype)  # Module.to(dtype) converts floating-point tensors only
            model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype), with_kwargs=True)
            model.register_forward_hook(_outputs_to_fp32)
            info["tensors_cast"] = len(floating)
        else:
            state = _AutocastState(device_type(model, default=ctx.device), dtype)
            enter, leave = (globals().get(n) or __getattr__(n) for n in ("_enter_autocast", "_exit_autocast"))
            model.register_forward_pre_hook(functools.partial(enter, state))
            model.register_forward_hook(functools.partial(leave, state), always_call=True)
            info["device_type"] = state.device_type
        return PassResult(model, modified=True, info=info)


register_reapply(CastPass)
