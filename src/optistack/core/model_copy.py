"""How a pass's input is made: a deep copy, or a copy-on-write one that shares the tensors.

A deep copy of every pass's input costs the whole model per pass: a 1B fp32 model (4.4 GB) held as
the original, the previous good model and the pass's copy needs more than 13 GB. Most weight passes
never write into a tensor: they build new layers and swap them in (quantization, kernel fusion). For
those, `shared_copy` copies every module and every other object of the model (configs, hooks, dicts)
but hands back the same Parameter and tensor objects, so only what the pass replaces is new memory.

What keeps that safe: a pass opts in (`copy_on_write = True`; any other pass gets a deep copy), and
`TensorGuard` holds it to that twice. While the pass runs, `protect()` refuses (before it happens) any
in-place torch call, `out=` or `.data =` aimed at the storage of a shared tensor, so the model before
the pass and the caller's original stay as they were; after it, `changed()` compares fingerprints
(in-place edit counter, storage address, shape, dtype, requires_grad) to catch writes that bypass
torch's Python API (a C++ extension, a numpy view).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

from .errors import PassApplyError


def _tensor_type() -> Any:
    import torch

    return torch.Tensor


def model_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every parameter, buffer and plain tensor attribute of every module in
    `model` (each tensor object once), or nothing when `model` is not a torch module."""
    if not hasattr(model, "named_modules"):
        return
    tensor, seen = _tensor_type(), set()
    for prefix, module in model.named_modules(remove_duplicate=True):
        state = vars(module)
        groups = (state.get("_parameters") or {}, state.get("_buffers") or {}, state)
        for group in groups:
            for name, t in list(group.items()):
                if isinstance(t, tensor) and id(t) not in seen:
                    seen.add(id(t))
                    yield (f"{prefix}.{name}" if prefix else name), t


def shared_copy(model: Any) -> Any:
    """A copy of `model` whose modules, dicts, configs and hooks are new but whose tensors are the
    same objects: replacing a submodule or a parameter of the copy leaves `model` as it was; writing
    into one of its tensors in place does not (that is what `TensorGuard` is for)."""
    memo: dict[int, Any] = {id(t): t for _, t in model_tensors(model)}
    return copy.deepcopy(model, memo)


def _fingerprint(t: Any) -> tuple:
    try:
        version = t._version
    except Exception:  # inference tensors keep no counter (and cannot be written outside inference mode)
        version = None
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # tensor subclasses without one storage (torchao weights): their parts are not walked
        ptr = None
    return (version, ptr, t.storage_offset() if ptr is not None else None, tuple(t.shape), t.dtype,
            t.requires_grad)


def _storage(t: Any) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except Exception:
        return 0


def _write_targets(name: str, args: tuple, kwargs: dict) -> list[Any]:
    """The tensors a torch call writes into: `self` of an in-place method (`mul_`, `copy_`, `__setitem__`,
    a `.data =` setter, `torch.nn.init.*_`) and anything passed as `out=`."""
    targets: list[Any] = []
    if args and ((name.endswith("_") and not name.startswith("__")) or name in ("__setitem__", "__set__")):
        targets.append(args[0])
    out = kwargs.get("out")
    if out is not None:
        targets.append(out)
    flat: list[Any] = []
    for t in targets:
        flat.extend(t if isinstance(t, (list, tuple)) else [t])
    return flat


class TensorGuard:
    """The tensors a copy-on-write pass shares with the model before it: `protect()` while it runs,
    `changed()` after it."""

    def __init__(self, model: Any, who: str = "the pass") -> None:
        self.who = who
        self._tensors = list(model_tensors(model))
        self._before = [_fingerprint(t) for _, t in self._tensors]
        self._names = {_storage(t): n for n, t in self._tensors}
        self._names.pop(0, None)

    def __len__(self) -> int:
        return len(self._tensors)

    def changed(self) -> list[str]:
        return [name for (name, t), before in zip(self._tensors, self._before) if _fingerprint(t) != before]

    def protect(self) -> Any:
        """A context in which a torch call that would write into a shared tensor raises `PassApplyError`."""
        if not self._names:
            return contextlib.nullcontext()
        from torch import Tensor
        from torch.overrides import TorchFunctionMode

        names, who = self._names, self.who

        class NoSharedWrites(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                fname = getattr(func, "__name__", "")
                for t in _write_targets(fname, args, kwargs):
                    shared = names.get(_storage(t)) if isinstance(t, Tensor) else None
                    if shared is not None:
                        raise PassApplyError(
                            f"{who} declares copy_on_write but tried to write in place ({fname}) into "
                            f"'{shared}', a tensor it shares with the model before it (and maybe the caller's "
                            "original); the write was refused and the result is discarded. A pass that edits "
                            "weights in place must not declare copy_on_write (it then gets a deep copy)")
                return func(*args, **kwargs)

        return NoSharedWrites()


def peak_rss_bytes() -> int | None:
    """The process's resident high-water mark (VmHWM; ru_maxrss where /proc is missing), None if unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except Exception:
        return None
