"""Interleaved timing of several callables in short blocks, so drift of the machine hits all of them alike.

Rounds follow a balanced, shuffled order: every cycle of rounds runs each permutation of the callables
once (AB/BA for two, all six orders for three), so no callable always runs first, last, or right after
the same neighbour (whose cache footprint or frequency state it would inherit). Warm-up is interleaved
the same way, so every callable is warmed alike.

In a round each callable gets a *block* of `TimingConfig.block` consecutive calls. The first call of a
block pays for the switch from the other model (its weights, packed buffers and the matrix unit's state
were displaced: on an AMX Xeon a bf16 model's first call after an fp32 one is ~10% slower), so it is
kept apart (`Samples.first_after_switch`); the round's sample is the median of the calls after it, the
steady state a deployed model, running alone, sees, and what an independent timer that warms a model
up before timing it reads. `block=1` is call-by-call interleaving (every sample is a first call after
a switch; on the AMX Xeon it read a compiled bf16 MiniLM ~5% slower than its steady state).

Before timing, `allocator="steady"` (the default) fixes glibc malloc's thresholds once per process
(`bench.allocator`): otherwise an eager model's page faults, and so its time, depend on what the
process allocated before. Every steady call's minor page faults are counted too
(`latency_ms.page_faults_per_call`).

With `batches`, every call of a round gets a fresh input batch (made before the round, never timed);
every callable in the round runs the same batches in the same order, and no batch is ever timed twice
on one callable: a model that caches outputs for repeated inputs gains nothing.

Sampling follows the noise: after `min_rounds`, it stops once the speedup CI of the compared pair is
tighter than `target_half_width` *and* the rounds are enough for the pair's measured spread (noisier
pairs need more rounds), or when `max_rounds` / `max_seconds` is reached.
"""
from __future__ import annotations

import gc
import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..core.errors import OptistackError
from .allocator import minor_faults, steady_allocator
from .stats import paired_speedup, summarize

MAX_BLOCK = 64
ALLOCATORS = ("steady", "as-is")


class TimingConfigError(OptistackError, ValueError):
    """A TimingConfig with settings that cannot time anything (one line: which and what is valid)."""


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2
    min_rounds: int = 10
    max_rounds: int = 60
    max_seconds: float = 30.0
    target_half_width: float = 0.02
    noise_floor: bool = True  # A/A of the original against a copy before the pipeline (see instrument)
    block: int = 2  # consecutive calls of one model per round; with 2+, the first (after a switch) is kept apart
    allocator: str = "steady"  # "steady": fix glibc malloc's thresholds first (bench.allocator); "as-is": leave them

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 1 <= self.block <= MAX_BLOCK:
            raise TimingConfigError(
                f"TimingConfig needs block to be a whole number from 1 to {MAX_BLOCK} (consecutive calls of one "
                f"model per round; 1 interleaves call by call, 2 times one steady call after each switch); "
                f"got {self.block!r}"
            )
        if self.allocator not in ALLOCATORS:
            raise TimingConfigError(
                f"TimingConfig needs allocator to be one of {ALLOCATORS} (\"steady\" fixes glibc malloc's thresholds "
                f"so an eager model's page faults do not depend on the process's history); got {self.allocator!r}"
            )
        if self.warmup < 0 or self.min_rounds < 3 or self.max_rounds < self.min_rounds or self.max_seconds <= 0:
            raise TimingConfigError(
                "TimingConfig needs warmup >= 0, min_rounds >= 3, max_rounds >= min_rounds, max_seconds > 0; "
                f"got {self}"
            )
        if not self.target_half_width > 0:
            raise TimingConfigError(
                f"TimingConfig needs target_half_width > 0 (e.g. 0.02 for ±2%); got {self.target_half_width!r}"
            )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Wall time of one call in milliseconds (CUDA synchronized before reading the clock)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


def round_orders(names: list[str], seed: int = 0):
    """Endless orders of `names`: shuffled blocks of all permutations (random ones beyond four names)."""
    rng = random.Random(seed)
    if len(names) > 4:
        while True:
            yield rng.sample(names, len(names))
    perms = [list(p) for p in itertools.permutations(names)]
    while True:
        block = perms[:]
        rng.shuffle(block)
        yield from block


def rounds_for_noise(baseline_ms: list[float], candidate_ms: list[float], target_half_width: float) -> int:
    """Rounds a ratio-of-medians CI needs to reach ±target given the pairs' spread so far.

    The spread is the robust standard deviation (1.4826 x MAD) of the per-round log ratios; a median
    is ~1.25x less efficient than a mean, hence 1.96 x 1.25.
    """
    d = np.log(np.asarray(baseline_ms, dtype=np.float64) / np.asarray(candidate_ms, dtype=np.float64))
    if d.size < 3:
        return 3
    spread = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    return math.ceil((1.96 * 1.25 * spread / target_half_width) ** 2)


class Samples(dict):
    """name -> one steady-state sample per round in ms (the median of the block's calls after its first),
    which is what paired speedups compare. Also kept: `calls` (every steady call, for latency summaries)
    and `first_after_switch` (a block's first call when the callable before it was another one)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__({name: [] for name in names})
        self.calls: dict[str, list[float]] = {name: [] for name in names}
        self.first_after_switch: dict[str, list[float]] = {name: [] for name in names}
        self.faults: dict[str, list[int]] = {name: [] for name in names}  # minor page faults per steady call

    def record(self, name: str, block_ms: list[float], after_switch: bool, block_faults: list[int] | None = None) -> None:
        steady = block_ms[1:] or block_ms  # block=1: the only call is the sample
        self[name].append(float(np.median(steady)))
        self.calls[name].extend(steady)
        if block_faults:
            self.faults[name].extend(block_faults[1:] or block_faults)
        if after_switch:
            self.first_after_switch[name].append(block_ms[0])


def interleaved(fns: dict[str, Callable[..., Any]], cfg: TimingConfig, device: str = "cpu",
                compare: tuple[str, str] | None = None,
                batches: Callable[[], Any] | None = None, seed: int = 0) -> Samples:
    """Time every callable in a block of `cfg.block` calls per round, in a balanced order; returns
    `Samples` (a dict of per-round samples in ms per name).

    `compare=(baseline, candidate)` names the pair whose CI decides early stopping. With `batches`
    (a function returning a fresh batch per call), each callable is called as `fn(batch)`, every
    callable of a round on the same `cfg.block` batches; without it, as `fn()`.
    """
    if cfg.allocator == "steady":
        steady_allocator()
    names = list(fns)
    orders = round_orders(names, seed)
    samples = Samples(names)
    last: list[str | None] = [None]  # the callable timed last, across rounds: was a block's first call a switch?

    def one_round(record: bool) -> None:
        order = next(orders)
        if batches is None:
            args: list[tuple[Any, ...]] = [()] * cfg.block
        else:
            args = [(batches(),) for _ in range(cfg.block)]  # made before the round: not timed
        for name in order:
            fn = fns[name]
            block_ms, block_faults = [], []
            for a in args:
                faults = minor_faults()
                block_ms.append(time_call(lambda a=a: fn(*a), device))
                block_faults.append(minor_faults() - faults)
            if record:
                samples.record(name, block_ms, after_switch=last[0] not in (None, name), block_faults=block_faults)
            last[0] = name
        gc.collect(0)  # the youngest generation only: cheap, and outside every timed call

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call is noise that belongs to no callable
    try:
        for _ in range(cfg.warmup):  # caches, lazy init, compilation left: all callables alike
            one_round(record=False)
        started = time.perf_counter()
        for r in range(cfg.max_rounds):
            one_round(record=True)
            done = r + 1
            if done < cfg.min_rounds:
                continue
            if time.perf_counter() - started > cfg.max_seconds:
                break
            if compare is not None:
                base, cand = samples[compare[0]], samples[compare[1]]
                sp = paired_speedup(base, cand, n_boot=500)
                if sp.half_width <= cfg.target_half_width and done >= rounds_for_noise(base, cand, cfg.target_half_width):
                    break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def latency_summary(samples: Samples, name: str) -> dict[str, Any]:
    """The report's `latency_ms` of one callable: every steady call summarized, plus the median first
    call after a switch (None when it never followed another callable) and the median minor page
    faults of a steady call (None where they were not counted)."""
    first, faults = samples.first_after_switch[name], samples.faults[name]
    return summarize(samples.calls[name]).to_dict() | {
        "first_call_after_switch_ms": float(np.median(first)) if first else None,
        "page_faults_per_call": float(np.median(faults)) if faults else None}
