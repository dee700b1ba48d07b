"""The C heap under torch's CPU tensors: glibc found once, and its free pages handed back to the system.

Why here, at the ground: loading hands back the file's copy of what a re-run step repacked, the decode engine
pass the temporaries of the passes before it, and the benchmark's memory probe a steady allocator's free
memory (bench.allocator); all three need the same two calls, and none may import the others.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """glibc, found once (find_library runs ldconfig), or None elsewhere (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # absent outside glibc (musl): AttributeError
        libc.gnu_get_libc_version()
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the OS (glibc `malloc_trim(0)`): freed tensors in pieces below
    glibc's mmap threshold otherwise stay resident. Returns whether anything was released (False outside
    glibc)."""
    libc = glibc()
    return bool(libc is not None and libc.malloc_trim(0))
