"""The wheel's prebuilt kernel libraries: which one a CPU gets, and the refusal of another torch release.

Fast (no compiling): the full check, a wheel with the libraries installed where no compiler is, is
tests/test_wheel_kernels.py (`make wheel-check`)."""
from __future__ import annotations

import json

import pytest
import torch

from optistack.kernels import build, cpu, prebuilt

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c", "avx"}
SAPPHIRE_RAPIDS = AVX512 | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni"}
ICE_LAKE = AVX512 | {"avx512_vnni"}
SKYLAKE = set(AVX512)
HASWELL = {"avx", "avx2", "fma", "f16c"}
OLD = {"sse4_2", "avx"}
ALL = list(prebuilt.VARIANTS)


@pytest.fixture(autouse=True)
def _no_cap(monkeypatch):
    for var in ("OPTISTACK_CPU_ISA", "OPTISTACK_KERNELS", "OPTISTACK_SANITIZE", "OPTISTACK_ENGINE_PROFILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("flags, want", [(SAPPHIRE_RAPIDS, "avx512-bf16-vnni"), (ICE_LAKE, "avx512-vnni"),
                                         (SKYLAKE, "avx512"), (HASWELL, "avx2"), (OLD, "portable"),
                                         (AVX512 | {"avx512_bf16"}, "avx512")])
def test_each_cpu_gets_the_best_variant_it_runs(flags, want):
    assert prebuilt.choose_variant(flags, ALL) == want


def test_a_variant_is_compiled_as_the_first_use_build_would_on_such_a_cpu():
    """The same probe: a CPU with exactly a variant's flags builds with exactly that variant's flags."""
    for variant, flags in prebuilt.VARIANTS.items():
        assert prebuilt.variant_isa(variant) == build.x86_isa_flags(set(flags)), variant
    assert "-mavx512vnni" in prebuilt.variant_isa("avx512-vnni")[1]
    assert "-mavx512bf16" in prebuilt.variant_isa("avx512-bf16-vnni")[1]
    assert prebuilt.variant_isa("portable") == ("portable", [])
    with pytest.raises(ValueError, match="valid: avx512-bf16-vnni"):
        prebuilt.variant_isa("avx512-fp16")


def test_the_cap_and_the_built_set_limit_the_choice():
    assert prebuilt.choose_variant(SAPPHIRE_RAPIDS, ALL, cap="avx2") == "avx2"
    assert prebuilt.choose_variant(SAPPHIRE_RAPIDS, ALL, cap="avx512") == "avx512-vnni"  # as the JIT cap: + VNNI
    assert prebuilt.choose_variant(SAPPHIRE_RAPIDS, ALL, cap="portable") == "portable"
    assert prebuilt.choose_variant(SAPPHIRE_RAPIDS, ["avx2", "portable"]) == "avx2"
    assert prebuilt.choose_variant(HASWELL, ["avx512-bf16-vnni", "avx512"]) is None


def test_another_torch_release_is_refused_naming_both():
    built = {"torch": "2.13.0+cpu", "cxx11_abi": True}
    assert prebuilt.torch_mismatch(built, "2.13.0+cpu", True) is None
    assert prebuilt.torch_mismatch(built, "2.13.0+cu128", True) is None  # the same release's CUDA build
    why = prebuilt.torch_mismatch(built, "2.12.1", True)
    assert "torch 2.13.0+cpu" in why and "torch 2.12.1" in why and "torch==2.13.0" in why
    assert "ABI" in prebuilt.torch_mismatch(built, "2.13.0", False)


def _fake_wheel(tmp_path, monkeypatch, torch_version: str, variants=("avx512-bf16-vnni", "avx2", "portable")):
    libs = {v: f"{prebuilt.module_name(v)}.so" for v in variants}
    for name in libs.values():
        (tmp_path / name).write_bytes(b"")
    (tmp_path / prebuilt.MANIFEST).write_text(json.dumps(
        {"torch": torch_version, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "cpu": libs, "cuda": None}))
    monkeypatch.setattr(prebuilt, "DIRECTORY", tmp_path)
    prebuilt.manifest.cache_clear()
    return libs


@pytest.fixture
def _fresh_manifest():
    prebuilt.manifest.cache_clear()
    yield
    prebuilt.manifest.cache_clear()


def test_the_library_for_this_cpu_is_chosen_from_the_manifest(tmp_path, monkeypatch, _fresh_manifest):
    libs = _fake_wheel(tmp_path, monkeypatch, torch.__version__)
    choice = prebuilt.cpu_choice(HASWELL)
    assert choice.variant == "avx2" and choice.path == tmp_path / libs["avx2"]
    assert prebuilt.cpu_choice(SAPPHIRE_RAPIDS).variant == "avx512-bf16-vnni"
    monkeypatch.setenv("OPTISTACK_CPU_ISA", "avx2")
    assert prebuilt.cpu_choice(SAPPHIRE_RAPIDS).variant == "avx2"
    monkeypatch.setenv("OPTISTACK_KERNELS", "jit")  # the development override: build from the sources
    assert prebuilt.cpu_choice(SAPPHIRE_RAPIDS) == prebuilt.Choice()
    monkeypatch.delenv("OPTISTACK_KERNELS")
    (tmp_path / libs["avx2"]).unlink()
    assert "missing" in prebuilt.cpu_choice(HASWELL).reason


def test_without_a_compiler_another_torch_leaves_the_kernels_unavailable_with_one_reason(tmp_path, monkeypatch,
                                                                                        _fresh_manifest):
    _fake_wheel(tmp_path, monkeypatch, "1.13.1+cpu")
    monkeypatch.delitem(cpu._state, "error", raising=False)
    monkeypatch.setattr(build, "find_cxx", lambda: None)
    avail = cpu.available()
    assert not avail and "torch 1.13.1+cpu" in avail.reason and f"torch {torch.__version__}" in avail.reason
    monkeypatch.setattr(build, "find_cxx", lambda: "/usr/bin/c++")  # a compiler: the first-use build takes over
    assert cpu.available()


def test_a_source_checkout_has_no_prebuilt_libraries_and_builds_on_first_use(_fresh_manifest):
    """This suite runs from an editable install, which setup.py leaves without prebuilt libraries."""
    assert prebuilt.manifest() is None and prebuilt.cpu_choice() == prebuilt.Choice()
