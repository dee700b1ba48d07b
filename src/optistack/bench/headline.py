"""A report's headline: the numbers a user of the workload would quote, each vs the original model.

Every report has the latency speedup of the timed call. For causal LMs (`workload.kind ==
"causal-lm"`) the timed call is a prompt prefill, which is not what a chat user feels, so the headline
adds decode tokens/s and time-to-first-token ratios, read from the workload's extras
(`tokens_per_s`, `ttft_ms`) with 95% bootstrap CIs from the raw samples it recorded
(`extra["samples"]`: per-token decode times and repeated prefill times). The original's samples and a
step's come from two separate measurements, so the CI covers the noise within each, not drift
between them (unlike the latency CI, which is paired over interleaved rounds).
"""
from __future__ import annotations

import math
import statistics
from typing import Any

N_BOOT = 2000
AXES = ("latency", "decode", "ttft")
# axis -> (extra key, samples key, True when a higher value is faster)
_GENERATION = {"decode": ("tokens_per_s", "decode_token_ms", True), "ttft": ("ttft_ms", "ttft_ms", False)}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def is_causal_lm(report: Any) -> bool:
    return (report.workload or {}).get("kind") == "causal-lm"


def _bootstrap(before: list[float], after: list[float], stat: Any, seed: int = 0) -> list[float] | None:
    """95% CI of stat(before) / stat(after), resampling each side on its own (they are not paired)."""
    if len(before) < 3 or len(after) < 3:
        return None
    import numpy as np

    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    rng = np.random.default_rng(seed)
    bs = b[rng.integers(0, b.size, size=(N_BOOT, b.size))]
    as_ = a[rng.integers(0, a.size, size=(N_BOOT, a.size))]
    reduce = np.mean if stat is statistics.fmean else np.median
    ratios = reduce(bs, axis=1) / reduce(as_, axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return [float(low), float(high)]


def generation_ratio(base: dict[str, Any] | None, extra: dict[str, Any] | None, axis: str) -> dict[str, Any] | None:
    """How many times faster `extra` is than `base` on `axis` ("decode" or "ttft"): {"before", "after",
    "speedup", "ci95"} (ci95 None without samples), or None when either side lacks the measurement."""
    key, sample_key, higher_is_faster = _GENERATION[axis]
    before, after = _num((base or {}).get(key)), _num((extra or {}).get(key))
    if before is None or after is None or before <= 0 or after <= 0:
        return None
    speedup = after / before if higher_is_faster else before / after
    samples_b = ((base or {}).get("samples") or {}).get(sample_key) or []
    samples_a = ((extra or {}).get("samples") or {}).get(sample_key) or []
    # decode times are per token: tokens/s is 1000 / median, or 1000 / mean when a call yields several
    # tokens (speculative decoding: `tokens_per_step` is present); TTFT is the median prefill
    spread = axis == "decode" and any("tokens_per_step" in (d or {}) for d in (base, extra))
    ci = _bootstrap(samples_b, samples_a, statistics.fmean if spread else statistics.median)
    return {"before": before, "after": after, "speedup": speedup, "ci95": ci}


def step_speedup(report: Any, step: Any, axis: str, current: float = 1.0) -> tuple[float | None, list[float] | None]:
    """A step's speedup vs the original on `axis`, with its CI. Latency: the cumulative speedup (for a
    rejected step without one, `current` times its own step speedup); decode/TTFT: from the extras."""
    if axis == "latency":
        x = step.cumulative_speedup
        if _num(x) is None and step.status == "rejected" and _num((step.speedup or {}).get("median")) is not None:
            return current * step.speedup["median"], None
        return (x, step.cumulative_ci95) if _num(x) is not None else (None, None)
    if axis not in _GENERATION:
        raise ValueError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    ratio = generation_ratio((report.baseline or {}).get("extra"), step.extra, axis)
    return (ratio["speedup"], ratio["ci95"]) if ratio else (None, None)


def headline(report: Any) -> dict[str, Any]:
    """{"latency": {...}} and, for causal LMs whose last applied step measured them, "decode" (tokens/s)
    and "ttft" entries; each has "speedup" (x faster than the original) and "ci95", and names its step."""
    applied = [(i, s) for i, s in enumerate(report.steps, 1) if s.status == "applied"]
    timed = next(((i, s) for i, s in reversed(applied) if s.cumulative_speedup is not None), None)
    out: dict[str, Any] = {"latency": {
        "speedup": timed[1].cumulative_speedup if timed else 1.0,
        "ci95": timed[1].cumulative_ci95 if timed else None,
        "step": timed[0] if timed else None,
        "what": "the workload's timed call" + (" (a prompt prefill)" if is_causal_lm(report) else ""),
    }}
    if not is_causal_lm(report) or not applied:
        return out
    index, last = applied[-1]
    base = (report.baseline or {}).get("extra")
    for axis in _GENERATION:
        ratio = generation_ratio(base, last.extra, axis)
        if ratio is not None:
            out[axis] = {**ratio, "step": index,
                         "what": "decode tokens/s" if axis == "decode" else "time to first token (ms)"}
    return out


def default_axis(report: Any) -> str:
    """What a plot shows unless asked: decode speed for a causal LM that measured it, else latency."""
    if is_causal_lm(report) and any(generation_ratio((report.baseline or {}).get("extra"), s.extra, "decode")
                                    for s in report.steps):
        return "decode"
    return "latency"
