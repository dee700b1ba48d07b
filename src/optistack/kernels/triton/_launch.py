"""Device checks shared by the Triton kernels; imported before any `@triton.jit` so `INTERPRETED`
records the mode the kernels were built in (Triton reads TRITON_INTERPRET when a kernel is decorated)."""
from __future__ import annotations

import contextlib

import torch

from . import interpreter_requested

INTERPRETED = interpreter_requested()


def check_tensors(op: str, *tensors: torch.Tensor) -> torch.device:
    """One device for all inputs; CPU only under the interpreter. Returns that device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"triton {op}: all inputs must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"triton {op}: tensors are on the CPU; the Triton kernels need a CUDA GPU "
                           "(or TRITON_INTERPRET=1 set before they are first imported, for tests)")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"triton {op}: unsupported device {device}")
    return device


def on_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def rows(x: torch.Tensor, op: str) -> torch.Tensor:
    """x as a contiguous [rows, last dim] matrix (a view when already contiguous)."""
    if x.dim() == 0:
        raise ValueError(f"triton {op}: expected at least one dimension, got a scalar")
    return x.reshape(-1, x.shape[-1]).contiguous()


def autotuned(kernel, configs: list[dict], key: list[str]):
    """`kernel` tuned over `configs` on the GPU (once per distinct `key` values), or as is under the
    interpreter, which cannot time anything: `default_config` then supplies the block sizes."""
    if INTERPRETED:
        return kernel
    import triton

    tconfigs = [triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c.get("num_warps", 4),
                              num_stages=c.get("num_stages", 3)) for c in configs]
    return triton.autotune(configs=tconfigs, key=key)(kernel)


def launch_config(configs: list[dict]) -> dict:
    """Extra launch arguments: none when autotuned (the tuner picks), else the first config."""
    if not INTERPRETED:
        return {}
    return {k: v for k, v in configs[0].items() if k.isupper()}
