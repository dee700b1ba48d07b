"""Interleaved timing of several callables: A, B, C, then B, C, A, ... so drift hits all of them alike.

Sampling is adaptive: after `min_rounds`, it stops once the speedup CI of the last callable against
the first is tighter than `target_half_width`, or when `max_rounds` / `max_seconds` is reached.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from .stats import paired_speedup


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2
    min_rounds: int = 10
    max_rounds: int = 60
    max_seconds: float = 30.0
    target_half_width: float = 0.02

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_rounds < 3 or self.max_rounds < self.min_rounds or self.max_seconds <= 0:
            raise ValueError(
                "TimingConfig needs warmup >= 0, min_rounds >= 3, max_rounds >= min_rounds, max_seconds > 0; "
                f"got {self}"
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


def interleaved(fns: dict[str, Callable[[], Any]], cfg: TimingConfig, device: str = "cpu",
                compare: tuple[str, str] | None = None) -> dict[str, list[float]]:
    """Time every callable round-robin with a rotating start; returns samples in ms per name.

    `compare=(baseline, candidate)` names the pair whose CI decides early stopping.
    """
    names = list(fns)
    for name in names:  # warm-up: caches, lazy init, and any compilation left
        for _ in range(cfg.warmup):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(cfg.max_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(time_call(fns[name], device))
        done = r + 1
        if done >= cfg.min_rounds:
            if time.perf_counter() - started > cfg.max_seconds:
                break
            if compare is not None:
                sp = paired_speedup(samples[compare[0]], samples[compare[1]], n_boot=500)
                if sp.half_width <= cfg.target_half_width:
                    break
    return samples
