"""Build-on-first-use for the C++ kernels: CPU feature probing, a persistent cache, a build lock.

The build directory is ~/.cache/optistack/kernels/<backend>-<hash>/ (or $OPTISTACK_KERNEL_CACHE), the hash
covering the sources, the compiler flags and the torch version, so a second process (or a second run)
loads the finished library instead of compiling for a minute. A file lock keeps two processes from
building into the same directory at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
from contextlib import contextmanager
from pathlib import Path

# The sources live in csrc/ at the top of the repository; the package reaches them as optistack/csrc
# (a link in the source tree, real files in the wheel: the package data copies what the link points to).
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def cache_root() -> Path:
    return Path(os.environ.get("OPTISTACK_KERNEL_CACHE", Path.home() / ".cache" / "optistack" / "kernels"))


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


# The instruction-set levels the kernels are written for, best first: (level, the /proc/cpuinfo flags it
# needs, compiler flags). The JIT build picks the first the CPU has; the wheel carries one build per level
# (prebuilt.py), picked the same way at load time.
ISA_LEVELS: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("avx512-bf16", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c")),
    ("avx512", frozenset({"avx512f", "avx512bw", "avx512vl"}), ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c")),
    ("avx2", frozenset({"avx2", "fma"}), ("-mavx2", "-mfma", "-mf16c")),
    ("portable", frozenset(), ()),
)
# int16 dot products for the int8 kernel (vpdpwssd; vpmaddwd without it), added to the AVX-512 levels
VNNI_FLAG, VNNI_CFLAG = "avx512_vnni", "-mavx512vnni"


def isa_levels(flags: set[str] | frozenset[str]) -> list[tuple[str, list[str]]]:
    """(level, compiler flags) of every level a CPU with these flags runs, best first (no cap applied)."""
    levels = [(name, list(cflags)) for name, need, cflags in ISA_LEVELS if need <= flags]
    if VNNI_FLAG in flags:
        levels = [(name, [*f, VNNI_CFLAG] if name.startswith("avx512") else f) for name, f in levels]
    return levels


def isa_cap() -> str | None:
    """$OPTISTACK_CPU_ISA (avx512-bf16|avx512|avx2|portable): the best level to use, e.g. to test the AVX2 path."""
    return os.environ.get("OPTISTACK_CPU_ISA") or None


def x86_isa_flags(flags: set[str] | None = None) -> tuple[str, list[str]]:
    """(level, compiler flags) for the best instruction set this CPU has that the kernels use, under
    $OPTISTACK_CPU_ISA's cap."""
    levels = isa_levels(cpu_flags() if flags is None else flags)
    cap = isa_cap()
    names = [name for name, _ in levels]
    if cap in names:
        levels = levels[names.index(cap):]
    return levels[0]


def find_cxx() -> str | None:
    """The C++ compiler torch's extension builder would use ($CXX, else c++/g++/clang++)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def build_key(sources: list[Path], flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for src in sorted(sources):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


@contextmanager
def build_lock(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".optistack.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        # torch's builder marks a build in progress with a file named `lock` and removes it when done; a build
        # killed midway (Ctrl-C, a test timeout) leaves it, and every later build of this key then waits for it
        # forever. Under this flock no other build of the key runs (the kernel drops a dead process's flock),
        # so a `lock` here is always such a leftover.
        (directory / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_and_load(backend: str, name: str, sources: list[Path], cflags: list[str], headers: list[Path] = (),
                   ldflags: list[str] = ()):
    """Compile (once per source/flags/torch version) and import the extension module (its
    TORCH_LIBRARY ops register as it loads)."""
    from torch.utils import cpp_extension

    key = build_key([*sources, *headers], [*cflags, *ldflags])
    directory = cache_root() / f"{backend}-{key}"
    with build_lock(directory):
        return cpp_extension.load(name=f"{name}_{key}", sources=[str(s) for s in sources], extra_cflags=cflags,
                                  extra_ldflags=list(ldflags), build_directory=str(directory), is_python_module=True,
                                  verbose=False)
