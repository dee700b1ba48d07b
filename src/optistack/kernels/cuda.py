"""CUDA C++ backend ("cuda") of the kernel contract in `reference`: fused RMSNorm (+ residual),
SwiGLU and int4 weight-only matmul, as `torch.ops.optistack_cuda.*` operators.

The sources (optistack/csrc/cuda/, one translation unit `ops.cu`) are compiled on first use with
`torch.utils.cpp_extension.load` into ~/.cache/optistack/kernels/cuda-<hash of sources, flags, torch
and CUDA versions>/ (see build.py; $OPTISTACK_KERNEL_CACHE moves it), so later processes load the
built library without rebuilding. The C++ side defines
the operators (TORCH_LIBRARY(optistack_cuda)) and their CUDA implementations; this module registers
their fake (meta) implementations, so the ops compose with torch.compile. FP8 has no CUDA version
(see the Triton backend).

Int4 layout (`int4_prepack`): qweight int32 [N, K/8], nibble j of word i = code of input channel
8*i + j; scale/zero float32 [N, K/g]. group_size must be a multiple of 32.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from ..core.requirements import Availability
from . import build, prebuilt

BACKEND = "cuda"
SOURCE_DIR = build.CSRC / "cuda"
ENTRY = "ops.cu"
_lock = threading.Lock()


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda (cpp_extension's order)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (str(p) if (p := Path("/usr/local/cuda/bin/nvcc")).exists() else None)


def available() -> Availability:
    """Cheap: looks for a CUDA build of torch, a GPU, nvcc and ninja; builds nothing."""
    if "error" in _state:
        return Availability.no(f"the CUDA kernels failed to build: {_state['error']}")
    if torch.version.cuda is None:
        return Availability.no(f"torch {torch.__version__} is built without CUDA; the CUDA kernels need a "
                               "CUDA build of torch and a GPU")
    if not torch.cuda.is_available():
        return Availability.no("no CUDA GPU is visible to torch on this machine")
    if prebuilt.cuda_choice().path is not None:  # an installed wheel built with nvcc: nothing to compile
        return Availability.yes()
    if find_nvcc() is None:
        return Availability.no("nvcc not found (set CUDA_HOME); the CUDA kernels are compiled on first use")
    if shutil.which("ninja") is None:
        return Availability.no("ninja not found (pip install ninja); torch's extension builder needs it")
    return Availability.yes()


_CUDA_CFLAGS = ["-O3"]
_state: dict[str, str] = {}  # "path": the loaded library, or "error": why the build failed


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))


def sources_hash() -> str:
    """Changes whenever a source, the flags, torch or its CUDA version changes: a new build directory."""
    return build.build_key(_sources(), [*_CUDA_CFLAGS, f"cuda={torch.version.cuda}"])


def build_directory() -> Path:
    return build.cache_root() / f"cuda-{sources_hash()}"


def load_library() -> str:
    """Build (first time on this machine; ~1 minute) and load the operator library, then register the
    fake impls. Raises RuntimeError saying why not; a failed build is remembered (see `available`)."""
    if "path" in _state:
        return _state["path"]
    with _lock:
        if "path" in _state:
            return _state["path"]
        check = available()
        if not check.ok:
            raise RuntimeError(f"optistack cuda kernels unavailable: {check.reason}")
        from torch.utils.cpp_extension import load

        choice = prebuilt.cuda_choice()
        if choice.path is not None:  # the wheel's build (a plain ops library, as below)
            torch.ops.load_library(str(choice.path))
            _register_fakes()
            _state["path"] = str(choice.path)
            return _state["path"]
        directory = build_directory()
        try:
            with build.build_lock(directory):
                path = load(name=f"optistack_cuda_{sources_hash()}", sources=[str(SOURCE_DIR / ENTRY)],
                            extra_include_paths=[str(SOURCE_DIR)], extra_cuda_cflags=_CUDA_CFLAGS,
                            build_directory=str(directory), is_python_module=False,
                            verbose=os.environ.get("OPTISTACK_VERBOSE_BUILD") == "1")
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError with the log
            _state["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise RuntimeError(f"optistack cuda kernels failed to build: {_state['error']}") from exc
        _register_fakes()
        _state["path"] = str(path)
        return _state["path"]


def ensure_built() -> None:
    """Build/load now (as `cpu.ensure_built`), so a broken toolchain shows up before the first forward."""
    load_library()


def int4_supports(group_size: int) -> bool:
    """Whether `int4_prepack` takes this group size (multiples of 32: one 16-byte load per group slice)."""
    return group_size >= 32 and group_size % 32 == 0


# ---- fake (meta) implementations: output shapes and dtypes, for torch.compile ----------------------

def fake_rms_norm(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_rms_norm_residual(x, residual, weight, eps):
    return fake_rms_norm(x, weight, eps), fake_rms_norm(x, weight, eps)


def fake_swiglu(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def fake_int4_matmul(x, qweight, scale, zero, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _register_fakes() -> None:
    for name, fn in (("rms_norm", fake_rms_norm), ("rms_norm_residual", fake_rms_norm_residual),
                     ("swiglu", fake_swiglu), ("int4_matmul", fake_int4_matmul)):
        torch.library.register_fake(f"optistack_cuda::{name}", fn)


def _ops():
    load_library()
    return torch.ops.optistack_cuda


# ---- the contract's functions -----------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """See `reference.rms_norm`: y, or (y, x + residual) when `residual` is given."""
    if residual is None:
        return _ops().rms_norm(x, weight, float(eps))
    return tuple(_ops().rms_norm_residual(x, residual, weight, float(eps)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """See `reference.swiglu`."""
    return _ops().swiglu(gate, up)


def int4_prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> dict:
    """Codes uint8 [N, K] (0..15), scale/zero [N, K/g] -> {"qweight": int32 [N, K/8], "scale", "zero":
    float32 [N, K/g]}, on the codes' device (plain torch: runs anywhere)."""
    n, k = codes.shape
    if not int4_supports(group_size):
        raise ValueError(f"cuda int4: group_size must be a multiple of 32, got {group_size}")
    if k % group_size:
        raise ValueError(f"cuda int4: K={k} is not a multiple of group_size={group_size}")
    if scale.shape != (n, k // group_size) or zero.shape != scale.shape:
        raise ValueError(f"cuda int4: scale and zero must be [{n}, {k // group_size}], "
                         f"got {tuple(scale.shape)} and {tuple(zero.shape)}")
    c = codes.to(torch.uint8)
    packed_bytes = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()  # byte b: channels 2b (low), 2b+1 (high)
    return {"qweight": packed_bytes.view(torch.int32), "scale": scale.float().contiguous(),
            "zero": zero.float().contiguous()}


def int4_matmul_packed(x: torch.Tensor, packed: dict, group_size: int, n: int, k: int) -> torch.Tensor:
    """y = x @ w.T for a weight packed by `int4_prepack` (GEMV up to 8 rows, dequantize + cuBLAS above)."""
    if packed["qweight"].shape != (n, k // 8):
        raise ValueError(f"cuda int4_matmul: qweight must be [{n}, {k // 8}] (pack with int4_prepack), "
                         f"got {tuple(packed['qweight'].shape)}")
    scale, zero = packed["scale"], packed["zero"]
    if scale.dtype != torch.float32:  # a module holding the packed weight was cast (model.half())
        scale, zero = scale.float(), zero.float()
    return _ops().int4_matmul(x, packed["qweight"], scale, zero, int(group_size))


def int4_matmul(x, codes, scale, zero, group_size: int):
    """See `reference.int4_matmul`; packs on every call (pack once with `int4_prepack` in a model)."""
    return int4_matmul_packed(x, int4_prepack(codes, scale, zero, group_size), group_size, *codes.shape)
