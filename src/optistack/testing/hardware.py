"""What this machine has (CUDA, AVX-512, AVX-512 BF16/VNNI, AMX, a C++ compiler), as predicates and as pytest
skip markers whose reason names what is missing. pytest is imported only when a marker is built."""
from __future__ import annotations

import functools
import os
import shlex
import shutil
from typing import Any, Iterable

FEATURES = {
    "cuda": "a CUDA GPU that torch can use",
    "avx512": "AVX-512 (avx512f)",
    "avx512_bf16": "AVX-512 BF16 instructions (avx512_bf16)",
    "avx512_vnni": "AVX-512 VNNI int8 dot products (avx512_vnni)",
    "amx": "AMX tiles for bf16 and int8 (amx_tile, amx_bf16, amx_int8)",
    "cxx": "a C++ compiler ($CXX, or c++, g++ or clang++ on PATH)",
}
# /proc/cpuinfo flags each CPU feature needs, all of them
_CPU_FLAGS = {
    "avx512": ("avx512f",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni",),
    "amx": ("amx_tile", "amx_bf16", "amx_int8"),
}
_COMPILERS = ("c++", "g++", "clang++")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    from ..kernels.build import cpu_flags as read  # the one reader of /proc/cpuinfo

    return frozenset(read())


def cxx_compiler() -> str | None:
    """The C++ compiler torch's extension builder would call: `$CXX` if set, else the first of c++, g++,
    clang++ on PATH; None when there is none."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shutil.which(shlex.split(cxx)[0])
    return next((path for path in map(shutil.which, _COMPILERS) if path), None)


def missing(feature: str, flags: Iterable[str] | None = None) -> str | None:
    """None when this machine has `feature` (one of FEATURES), else a sentence saying what is missing.
    `flags` replaces /proc/cpuinfo's flags (to ask about another machine's CPU)."""
    if feature not in FEATURES:
        raise ValueError(f"unknown hardware feature {feature!r}; valid: {', '.join(sorted(FEATURES))}")
    need = f"needs {FEATURES[feature]}"
    if feature == "cuda":
        return _cuda_missing(need)
    if feature == "cxx":
        if cxx_compiler():
            return None
        cxx = os.environ.get("CXX", "").strip()
        where = f"$CXX={cxx!r} is not an executable on PATH" if cxx else f"none of {', '.join(_COMPILERS)} is on PATH"
        return f"{need}: {where}"
    have = cpu_flags() if flags is None else frozenset(flags)
    if not have:
        return f"{need}: no CPU flags to read (/proc/cpuinfo is missing or has no 'flags' line)"
    lacking = [flag for flag in _CPU_FLAGS[feature] if flag not in have]
    return f"{need}: this CPU's flags lack {', '.join(lacking)}" if lacking else None


def _cuda_missing(need: str) -> str | None:
    try:
        import torch
    except ImportError:
        return f"{need}: torch is not installed"
    if torch.version.cuda is None and torch.version.hip is None:
        return f"{need}: torch {torch.__version__} is a CPU-only build"
    try:
        if torch.cuda.is_available():
            return None
    except Exception as e:  # a broken driver install raises instead of answering
        return f"{need}: torch.cuda.is_available() raised {type(e).__name__}: {e}"
    return f"{need}: torch sees no CUDA device on this machine"


def has(feature: str) -> bool:
    return missing(feature) is None


def has_cuda() -> bool:
    return has("cuda")


def has_avx512() -> bool:
    return has("avx512")


def has_avx512_bf16() -> bool:
    return has("avx512_bf16")


def has_avx512_vnni() -> bool:
    return has("avx512_vnni")


def has_amx() -> bool:
    return has("amx")


def has_cxx_compiler() -> bool:
    return has("cxx")


def requires(*features: str) -> Any:
    """A pytest skip marker: skips the test (or module, as `pytestmark`) unless the machine has every one of
    `features`, with a reason naming each one missing. `@requires("amx", "cxx")`."""
    import pytest

    if not features:
        raise ValueError(f"requires() needs at least one feature; valid: {', '.join(sorted(FEATURES))}")
    reasons = [why for why in map(missing, features) if why]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or f"has {', '.join(features)}")
