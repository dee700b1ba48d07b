"""Summary statistics for latency samples: percentiles, CV, and paired-bootstrap speedup CIs.

Speedup is the ratio of medians. Its CI resamples *pairs* of interleaved runs (the same indices for
baseline and candidate), so slow drift of the machine, which hits both members of a pair, cancels.
A change that does not clear the run's own noise floor (an A/A comparison of the original against a
copy of itself) reads "no measurable change", not a significant 1% slowdown.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

HIGH_CV = 0.10  # coefficient of variation above which a timing is flagged as noisy


@dataclass(frozen=True)
class LatencySummary:
    median: float
    p90: float
    p99: float
    mean: float
    std: float
    cv: float
    n: int

    @property
    def noisy(self) -> bool:
        return self.cv > HIGH_CV

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"median": self.median, "p90": self.p90, "p99": self.p99, "mean": self.mean,
                "std": self.std, "cv": self.cv, "n": self.n, "noisy": self.noisy}


def summarize(samples_ms: Sequence[float]) -> LatencySummary:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples to summarize")
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return LatencySummary(
        median=float(np.median(a)), p90=float(np.percentile(a, 90)), p99=float(np.percentile(a, 99)),
        mean=mean, std=std, cv=std / mean if mean > 0 else 0.0, n=int(a.size),
    )


@dataclass(frozen=True)
class Speedup:
    median: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the CI width relative to the estimate: 0.03 means about ±3%."""
        return (self.high - self.low) / (2 * self.median) if self.median > 0 else float("inf")

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, float | list[float]]:
        return {"median": self.median, "ci95": [self.low, self.high]}


def paired_speedup(baseline_ms: Sequence[float], candidate_ms: Sequence[float], *,
                   n_boot: int = 2000, seed: int = 0) -> Speedup:
    """median(baseline) / median(candidate) with a 95% paired-bootstrap CI (>1 means faster)."""
    b = np.asarray(baseline_ms, dtype=np.float64)
    c = np.asarray(candidate_ms, dtype=np.float64)
    if b.size != c.size or b.size == 0:
        raise ValueError("paired_speedup needs two equally long, non-empty sample lists")
    point = float(np.median(b) / np.median(c))
    if b.size < 3:
        return Speedup(point, point, point)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, b.size, size=(n_boot, b.size))
    ratios = np.median(b[idx], axis=1) / np.median(c[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Speedup(point, float(low), float(high))


NO_CHANGE = "no measurable change"


def noise_floor(aa: Speedup) -> float:
    """The run's noise floor from an A/A comparison (a model against a copy of itself): how far from
    1.0 the A/A ratio or its CI strayed, in either direction, as a fraction (0.027 means ±2.7%)."""
    edges = [aa.median, aa.low, aa.high]
    if not all(np.isfinite(edges)) or min(edges) <= 0:
        return float("inf")
    return max(max(e, 1.0 / e) for e in edges) - 1.0


def verdict(sp: Speedup, floor: float = 0.0) -> str:
    """"faster" / "slower" when the CI excludes 1.0 and the estimate lies outside the noise floor
    (±floor around 1.0, in ratio terms); otherwise "no measurable change"."""
    if sp.low > 1.0 and sp.median > 1.0 + floor:
        return "faster"
    if sp.high < 1.0 and sp.median < 1.0 / (1.0 + floor):
        return "slower"
    return NO_CHANGE
