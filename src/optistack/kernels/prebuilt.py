"""The C++ kernels a wheel carries, built at install time: which library this CPU and this torch can load.

A wheel built by setup.py holds one CPU library per instruction-set variant below, plus the CUDA one where
the build had nvcc and a CUDA torch, under optistack/kernels/_prebuilt/, and a manifest naming them and
the torch they were compiled against (the libraries link against torch's C++ ABI, so another torch
release cannot load them). A source checkout or an editable install has no _prebuilt/ directory and
builds on first use (build.py): the development path. Stdlib only until a library is loaded.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import build

DIRECTORY = Path(__file__).resolve().parent / "_prebuilt"
MANIFEST = "manifest.json"
MODULE_PREFIX = "optistack.kernels._prebuilt."
# One CPU build per class of x86-64 CPU, best first: the flags a CPU of that class shows in /proc/cpuinfo.
# Each is compiled with the flags build.x86_isa_flags picks on such a CPU (the same probe as the JIT
# build); AMX is probed at run time inside the AVX-512 builds. A CPU runs the first variant it has all
# the flags of (under $OPTISTACK_CPU_ISA's cap), so avx512-bf16 without VNNI (no such CPU ships) gets avx512.
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}
VARIANTS: dict[str, frozenset[str]] = {
    "avx512-bf16-vnni": frozenset(_AVX512 | {"avx512_bf16", "avx512_vnni"}),  # Sapphire Rapids, Zen 4
    "avx512-vnni": frozenset(_AVX512 | {"avx512_vnni"}),  # Cascade Lake, Ice Lake
    "avx512": frozenset(_AVX512),  # Skylake-SP
    "avx2": frozenset({"avx2", "fma"}),  # Haswell and later, Zen 1-3
    "portable": frozenset(),
}


def variant_isa(variant: str) -> tuple[str, list[str]]:
    """(level, compiler flags) of a variant: what the JIT probe picks on a CPU with exactly its flags."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown CPU kernel variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return build.isa_levels(VARIANTS[variant])[0]


def module_name(variant: str) -> str:
    """The extension's (and its PyInit_ symbol's) name: no dashes."""
    return "optistack_cpu_" + variant.replace("-", "_")


def choose_variant(cpu_flags: set[str] | frozenset[str], built: list[str] | tuple[str, ...],
                   cap: str | None = None) -> str | None:
    """The best of the `built` variants this CPU runs, at or below level `cap`; None when none fits."""
    order = [name for name, _, _ in build.ISA_LEVELS]
    top = order.index(cap) if cap in order else 0
    for variant in VARIANTS:
        if variant in built and VARIANTS[variant] <= cpu_flags and order.index(variant_isa(variant)[0]) >= top:
            return variant
    return None


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def torch_mismatch(recorded: dict[str, Any], version: str, cxx11_abi: bool) -> str | None:
    """Why libraries built against `recorded` torch cannot load into this one (None: they can). The
    release and the C++ ABI must match; the local tag (+cpu, +cu128) names the build, not the ABI."""
    built = recorded.get("torch", "?")
    if _release(built) == _release(version) and recorded.get("cxx11_abi", cxx11_abi) == cxx11_abi:
        return None
    abi = "" if _release(built) != _release(version) else " (another C++ ABI)"
    return (f"optistack's prebuilt C++ kernels were built against torch {built}; this environment has torch "
            f"{version}{abi}, whose C++ ABI they cannot link against: install torch=={_release(built)} "
            f"(the CPU build: --index-url https://download.pytorch.org/whl/cpu), or a C++ compiler (g++) so "
            f"optistack builds them for torch {version} on first use")


@functools.lru_cache(maxsize=1)
def manifest() -> dict[str, Any] | None:
    """What setup.py recorded in the wheel, or None (a source checkout: no prebuilt libraries)."""
    path = DIRECTORY / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise RuntimeError(f"{path} is not a JSON object; reinstall optistack")
    return data


def jit_requested() -> bool:
    """Builds the prebuilt libraries cannot stand in for: $OPTISTACK_KERNELS=jit, AddressSanitizer,
    engine profiling (their flags differ)."""
    env = os.environ
    return (env.get("OPTISTACK_KERNELS") == "jit" or env.get("OPTISTACK_SANITIZE", "") != ""
            or env.get("OPTISTACK_ENGINE_PROFILE") == "1")


@dataclass(frozen=True)
class Choice:
    """A prebuilt library to load (`path`), or why there is none (`reason`; None: the install has none)."""

    path: Path | None = None
    reason: str | None = None
    variant: str | None = None


def _torch_check(man: dict[str, Any]) -> str | None:
    import torch

    return torch_mismatch(man, torch.__version__, bool(torch._C._GLIBCXX_USE_CXX11_ABI))


def cpu_choice(cpu_flags: set[str] | None = None) -> Choice:
    """The CPU library this process should load instead of building one."""
    man = manifest()
    if man is None or not man.get("cpu") or jit_requested():
        return Choice()
    why = _torch_check(man)
    if why:
        return Choice(reason=why)
    libs: dict[str, str] = man["cpu"]
    variant = choose_variant(build.cpu_flags() if cpu_flags is None else cpu_flags, list(libs), build.isa_cap())
    if variant is None:
        return Choice(reason=f"no prebuilt CPU kernel library fits this CPU (the wheel has {', '.join(libs)})")
    path = DIRECTORY / libs[variant]
    if not path.is_file():
        return Choice(reason=f"{path} is listed in the wheel's manifest but missing; reinstall optistack")
    return Choice(path=path, variant=variant)


def cuda_choice() -> Choice:
    """The CUDA library this process should load instead of building it (a plain torch-ops library)."""
    man = manifest()
    if man is None or not man.get("cuda") or jit_requested():
        return Choice()
    why = _torch_check(man)
    if why:
        return Choice(reason=why)
    import torch

    if man.get("cuda_version") != torch.version.cuda:
        return Choice(reason=f"optistack's prebuilt CUDA kernels were built for CUDA {man.get('cuda_version')}; "
                             f"this torch has CUDA {torch.version.cuda}")
    return Choice(path=DIRECTORY / man["cuda"])


def load_module(path: Path) -> Any:
    """Import a prebuilt pybind extension (its TORCH_LIBRARY ops register as it loads)."""
    name = path.name.split(".", 1)[0]
    spec = importlib.util.spec_from_file_location(MODULE_PREFIX + name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
