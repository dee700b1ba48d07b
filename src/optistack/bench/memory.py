"""Memory figures: bytes a model holds, and peak memory while it runs (CUDA allocator or CPU RSS)."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import torch

from ..core.hooks import MODEL_BYTES_ATTR
from ..core.modeling import unwrap_compiled
from .allocator import release_free_memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (torchao int8 / int4 weights)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        try:
            names, _ = t.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(t, n), seen) for n in names if isinstance(getattr(t, n), torch.Tensor))
        except Exception:
            pass
    try:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen and key != 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    except Exception:
        return t.numel() * t.element_size()


def unwrap_module(model: Any) -> Any:
    """The nn.Module behind a torch.compile wrapper, if any."""
    return unwrap_compiled(model)


def model_bytes(model: Any) -> int | None:
    """Bytes of parameters and buffers (shared storage counted once); None when not a torch module."""
    module = unwrap_module(model)
    if not isinstance(module, torch.nn.Module):
        size = getattr(module, MODEL_BYTES_ATTR, None)
        return int(size()) if callable(size) else None
    seen: set[int] = set()
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(_tensor_bytes(t.data if isinstance(t, torch.nn.Parameter) else t, seen) for t in tensors)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak extra memory during one call: CUDA allocator peak on GPU, sampled RSS growth on CPU (after
    the heap's free memory is handed back, so the call's temporaries take fresh pages)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    release_free_memory()  # a steady allocator would serve the call from memory RSS already counts
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return int(peak[0] - base)
