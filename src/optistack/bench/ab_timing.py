"""What the benchmark's A/B timing stands on: fresh batches, a reference copy, and the run's noise floor.

- `BatchStream`: every timed call gets a batch the run has never timed before, from the workload's
  timing stream (`timing_batch(i)`), moved to the device before the round (all models of a round run
  the same batches). A model that caches outputs for repeated inputs therefore gains nothing; scoring
  uses the workload's evaluation data, which the stream never serves.
- `reference_copy`: speedups are measured against a deep copy of the original, not the original
  itself, so both sides of an A/B pair had their weights allocated the same way (a model loaded from
  disk may sit in file-backed or differently aligned pages that a fresh copy does not share). A model
  over `REFERENCE_COPY_MAX_BYTES` is timed as itself: the copy would raise the run's peak memory by the
  whole model, where the runner keeps it to the original plus what the passes replace.
- `measure_noise_floor`: an A/A comparison of the original against that copy, before any pass; a step
  whose speedup stays inside this floor reads "no measurable change".
"""
from __future__ import annotations

import copy
import itertools
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from .stats import Speedup, noise_floor, paired_speedup, summarize
from .timer import Samples, TimingConfig, interleaved

_INDICES = itertools.count(1)  # process-wide: a model kept from an earlier run or trial never sees a batch again


class BatchStream:
    """Fresh timing batches: index i of the workload's stream, i never used before in this process."""

    def __init__(self, workload: Any, device: str = "cpu") -> None:
        from ..core.workload import timing_batch

        self.workload, self.device = workload, device
        self._make = lambda i: timing_batch(workload, i)
        self.available = self._make(0) is not None
        self.served = self.repeats = 0
        self._seen: set[str] = set()

    def __call__(self) -> Any:
        """The next fresh batch on the device, or None when the workload has no timing stream."""
        if not self.available:
            return None
        from ..core.modeling import to_device
        from ..core.workload import batch_digest

        for _ in range(16):  # a workload whose stream repeats itself: skip the repeats
            batch = self._make(next(_INDICES))
            digest = batch_digest(batch)
            if digest not in self._seen:
                break
        else:  # too little data to vary (one one-word sentence, say): time it anyway, and say so
            self.repeats += 1
        self._seen.add(digest)
        self.served += 1
        return to_device(batch, self.device)

    def describe(self) -> str:
        if self.available and self.repeats:
            return (f"the workload's timing stream, which repeated batches ({self.repeats} of {self.served}): "
                    "caching is not fully excluded")
        if self.available:
            return "a fresh batch per call from the workload's timing stream (never scored data, never repeated)"
        return "one repeated batch: the workload has no timing stream (timing_batch), so caching is not excluded"


def caller(workload: Any, model: Any) -> Callable[[Any], Any]:
    """fn(batch) -> outputs: `workload.run(model, batch)`, or `workload.run(model)` for a None batch."""
    from ..core.workload import run_on

    return lambda batch: run_on(workload, model, batch)


def _free_bytes(device: str) -> int | None:
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info()[0])
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


REFERENCE_COPY_MAX_BYTES = 1 << 30  # 1 GiB: larger models are their own reference (bounded memory)


def reference_copy(model: Any, size_bytes: int | None, device: str = "cpu") -> tuple[Any, str]:
    """(a deep copy of `model`, how it was made), or (`model` itself, why not) when a copy cannot be made,
    would take more than half the free memory, or the model is over `REFERENCE_COPY_MAX_BYTES`."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return model, f"the original itself (a {type(model).__name__} is not copied)"
    if size_bytes is not None and size_bytes > REFERENCE_COPY_MAX_BYTES:
        return model, (f"the original itself (a copy of a model over {REFERENCE_COPY_MAX_BYTES >> 20} MiB would "
                       "raise the run's peak memory by its whole size)")
    free = _free_bytes(device)
    if free is not None and size_bytes is not None and size_bytes > free // 2:
        return model, "the original itself (a copy would take more than half the free memory)"
    try:
        return copy.deepcopy(model), "a deep copy of the original"
    except Exception as exc:
        return model, f"the original itself (it cannot be copied: {type(exc).__name__})"


def measure_noise_floor(run_original: Callable[[Any], Any], run_reference: Callable[[Any], Any],
                        cfg: TimingConfig, device: str, batches: BatchStream) -> tuple[dict[str, Any], Samples]:
    """A/A timing of the original against its reference copy: (report entry, the samples of both)."""
    samples = interleaved({"original": run_original, "reference": run_reference}, cfg, device,
                          compare=("original", "reference"), batches=batches)
    aa: Speedup = paired_speedup(samples["original"], samples["reference"])
    floor = noise_floor(aa)
    entry = {"aa_speedup": aa.to_dict(), "floor": floor, "rounds": len(samples["reference"]),
             "cv": summarize(samples["reference"]).cv}
    return entry, samples


_REFERENCES: "weakref.WeakKeyDictionary[Any, tuple[Any, Any, str]]" = weakref.WeakKeyDictionary()


@dataclass
class TimingContext:
    """What one run's timing shares across its steps (kept in `RunState.scratch`)."""

    batches: BatchStream
    reference: Any  # what "original" means in every A/B timing
    reference_how: str
    floor: float  # the A/A noise floor, 0.0 until measured


def timing_context(state: Any, cfg: TimingConfig) -> TimingContext:
    """The run's TimingContext, made on first use. The reference copy is kept per workload, so a
    search's trials (which share a workload and skip `before_pipeline`) time against the same copy;
    it goes away with the workload."""
    ctx = state.scratch.get("benchmark-timing")
    if ctx is not None:
        return ctx
    from .memory import model_bytes

    wl, device = state.workload, state.ctx.device
    key = (id(state.original), cfg.noise_floor)  # a new original, or the floor turned on/off: a new reference
    try:
        cached = _REFERENCES.get(wl)
    except TypeError:  # a workload that cannot be weakly referenced: no sharing
        cached = None
    if cached is not None and cached[0] == key:
        ref = cached[1:]
    else:
        if cfg.noise_floor:
            ref = reference_copy(state.original, model_bytes(state.original), device)
        else:
            ref = (state.original, "the original itself (noise_floor=False)")
        try:
            _REFERENCES[wl] = (key, *ref)
        except TypeError:
            pass
    floor = ((state.report.baseline or {}).get("noise_floor") or {}).get("floor") or 0.0
    ctx = TimingContext(BatchStream(wl, device), ref[0], ref[1], float(floor))
    state.scratch["benchmark-timing"] = ctx
    return ctx
