"""Builds the C++ kernels into the wheel (pyproject.toml holds everything else).

One CPU extension per instruction-set variant (optistack.kernels.prebuilt.VARIANTS: the sources, flags
and ISA probe the first-use build uses), the CUDA one where nvcc and a CUDA torch are here, and a
manifest recording the torch they link against. An editable install (`pip install -e .`) builds none:
a source checkout compiles on first use. $OPTISTACK_PREBUILT=0 builds a wheel without them;
$OPTISTACK_PREBUILT_VARIANTS=avx2,portable builds only those.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

from optistack.kernels import build, cpu, cuda, prebuilt  # noqa: E402

PKG = "optistack.kernels._prebuilt"
CSRC = Path("src/optistack/csrc")  # setuptools wants sources relative to this file


def _note(msg: str) -> None:
    print(f"optistack setup.py: {msg}", file=sys.stderr)


def _variants() -> list[str]:
    chosen = os.environ.get("OPTISTACK_PREBUILT_VARIANTS")
    if not chosen:
        return list(prebuilt.VARIANTS)
    names = [v.strip() for v in chosen.split(",") if v.strip()]
    bad = [v for v in names if v not in prebuilt.VARIANTS]
    if bad:
        raise SystemExit(f"OPTISTACK_PREBUILT_VARIANTS: unknown {bad}; valid: {', '.join(prebuilt.VARIANTS)}")
    return names


def _cpu_extension(variant: str):
    _, isa = prebuilt.variant_isa(variant)
    # -g0: Python's CFLAGS carry -g (the libraries would be 10x larger); -UNDEBUG: as the first-use build
    return CppExtension(f"{PKG}.{prebuilt.module_name(variant)}", [str(CSRC / "cpu" / s) for s in cpu.SOURCES],
                        extra_compile_args=[*cpu.BASE_CFLAGS, *isa, "-g0", "-UNDEBUG"], extra_link_args=cpu.LDFLAGS)


def _cuda_extension():
    import torch

    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} has no CUDA: the wheel carries no CUDA kernels (they build on first use)")
        return None
    if cuda.find_nvcc() is None:
        _note("nvcc not found (set CUDA_HOME): the wheel carries no CUDA kernels (they build on first use)")
        return None
    return CUDAExtension(f"{PKG}.optistack_cuda", [str(CSRC / "cuda" / cuda.ENTRY)], include_dirs=[str(CSRC / "cuda")],
                         extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": list(cuda._CUDA_CFLAGS)})


def _extensions() -> list:
    if os.environ.get("OPTISTACK_PREBUILT", "1") == "0":
        _note("OPTISTACK_PREBUILT=0: no prebuilt kernels; they build on first use")
        return []
    if not build.is_x86():
        _note(f"the CPU kernels target x86-64; this machine is {build.platform.machine()}: none prebuilt")
        return []
    exts = [_cpu_extension(v) for v in _variants()]
    cuda_ext = _cuda_extension()
    return exts + ([cuda_ext] if cuda_ext is not None else [])


class BuildKernels(BuildExtension):
    """torch's extension builder, one build directory per library (they share sources), a manifest after;
    nothing in editable mode (the development path builds on first use)."""

    def run(self) -> None:
        if self.editable_mode:
            _note("editable install: the C++ kernels build on first use (build.py), none prebuilt")
            return
        super().run()
        self._write_manifest()

    def build_extension(self, ext) -> None:
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[1])
        try:
            _note(f"compiling {ext.name}")
            super().build_extension(ext)
        finally:
            self.build_temp = base

    def _write_manifest(self) -> None:
        import torch

        libs = {ext.name.rsplit(".", 1)[1]: Path(self.get_ext_filename(ext.name)).name for ext in self.extensions}
        data = {"torch": torch.__version__, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                "cpu": {v: libs[prebuilt.module_name(v)] for v in prebuilt.VARIANTS if prebuilt.module_name(v) in libs},
                "cuda": libs.get("optistack_cuda"), "cuda_version": torch.version.cuda if "optistack_cuda" in libs else None}
        out = Path(self.build_lib) / Path(*PKG.split(".")) / prebuilt.MANIFEST
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        _note(f"prebuilt kernels for torch {data['torch']}: {', '.join(data['cpu'])}"
              + (", cuda" if data["cuda"] else " (no CUDA)"))


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels.with_options(use_ninja=True)})
