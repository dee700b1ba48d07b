"""A steady C allocator for timing: glibc malloc stops handing memory back to the OS between calls.

Why: eager PyTorch on CPU allocates its temporaries (MiniLM 8x128: ~6 MB each) with `malloc`. glibc
serves large requests with `mmap` and returns freed memory above its *trim threshold* to the OS, and
it moves both thresholds by itself as the process allocates (the "dynamic mmap threshold"). So how
many fresh pages an eager call touches depends on everything the process allocated before:
measured on a 2-vCPU Xeon VM, eager MiniLM took 9,000-18,000 minor page faults a call and 100-118 ms
early in a process, 0 faults and 79-88 ms after a pipeline had run in it (or with the thresholds
fixed), while a compiled model (its buffers planned once) took 0 faults and 25-29 ms throughout. A
speedup over eager then moved by 15-25% with the minute it was measured in (docs/reports.md,
"Checked from outside").

`steady_allocator()` fixes both thresholds once per process (`mallopt`), so no model's time depends
on the allocator's history, and eager runs at its best: speedups over it are the conservative ones.
The price is memory a process keeps after a peak (up to `TRIM_BYTES` free at the top of the heap);
`release_free_memory()` hands it back (the peak-memory probe does, so that it still sees a call's
temporaries).
Not glibc (macOS, musl, Windows): nothing is changed and the description says so.
"""
from __future__ import annotations

try:
    import resource  # Unix only
except ImportError:  # Windows: no fault counts
    resource = None

from ..core.heap import glibc, release_free_memory  # noqa: F401 (release_free_memory: bench.memory's, from here)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_BYTES = 256 << 20  # requests below this come from the heap, not a fresh mmap each call
TRIM_BYTES = 512 << 20  # free memory at the top of the heap kept, not returned to the OS

_state: dict[str, str] = {}
_glibc = glibc  # the tests' and older callers' name


def steady_allocator() -> str:
    """Fix glibc malloc's mmap and trim thresholds for this process (once; later calls only describe
    it). Returns what was done, for the report's `timing.allocator`."""
    if "how" in _state:
        if _state.get("fixed") == "" and (libc := _glibc()) is not None:  # after `for_transforms`: fix again
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
            _state["fixed"] = "yes"
        return _state["how"]
    libc = _glibc()
    if libc is None:
        how = "as the process had it: not glibc, so malloc's thresholds were left alone"
    elif libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1:
        how = (f"glibc malloc with fixed thresholds (mmap {MMAP_BYTES >> 20} MiB, trim {TRIM_BYTES >> 20} MiB, "
               "set once per process by optistack): a model's time does not depend on what the process "
               "allocated before")
        _state["fixed"] = "yes"
    else:
        how = "as the process had it: glibc refused the thresholds (mallopt returned 0)"
    _state["how"] = how
    return how


PASS_BYTES = 128 << 10  # glibc's own defaults: big blocks are mmapped, and handed back when freed


def for_transforms() -> None:
    """While a pass transforms the model (the benchmark's `before_pass`): glibc's default thresholds, so
    the pass's big temporaries go back to the OS when freed. Under the fixed ones they stay resident:
    on a 1B Llama, `rtn-int4` left 3.4 GiB of freed temporaries in the heap (peak 8.0 GiB against 4.6).
    `steady_allocator()` fixes the thresholds again before the next timing. No-op unless they were fixed."""
    libc = _glibc()
    if libc is not None and _state.get("fixed"):
        libc.mallopt(M_MMAP_THRESHOLD, PASS_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, PASS_BYTES)
        _state["fixed"] = ""


def allocator_state() -> str:
    """What timing in this process stands on, without changing anything."""
    return _state.get("how", "as the process had it: glibc's thresholds move with the allocation history")


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    if resource is None:
        return 0
    try:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (OSError, AttributeError):
        return 0
