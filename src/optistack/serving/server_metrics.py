"""What one LoadGen run measured: per-request records, percentiles, goodput, and LoadGen's own numbers.

Definitions (MLPerf's, as LoadGen computes them):
- TTFT: from the moment a request is issued to its first token.
- TPOT: (completion - first token) / (tokens - 1), per request; undefined (left out) for 1-token answers.
- Percentile p of n values: the sorted values at index floor(n * p) (LoadGen's rule; p99 of 16 values is
  the largest), so our percentiles and LoadGen's are the same statistic of two clocks.
- Goodput: requests per second that met *both* limits (TTFT <= ttft_limit and TPOT <= tpot_limit), over
  the run's duration (first issue to last completion); `goodput_tokens_per_s` counts their tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

PERCENTILES = (0.5, 0.9, 0.99)


def percentile(values: Sequence[float], p: float) -> float:
    """LoadGen's percentile: sorted(values)[floor(len * p)]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


@dataclass(frozen=True)
class LatencyStats:
    """Seconds: p50, p90, p99, mean and max over the requests of a run."""

    p50: float
    p90: float
    p99: float
    mean: float
    max: float

    @staticmethod
    def of(values: Sequence[float]) -> "LatencyStats":
        if not values:
            return LatencyStats(math.nan, math.nan, math.nan, math.nan, math.nan)
        return LatencyStats(*(percentile(values, p) for p in PERCENTILES), sum(values) / len(values), max(values))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, in seconds on time.perf_counter()."""

    issued: float
    token_times: tuple[float, ...]
    done: float
    finish_reason: str
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.issued if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    def meets(self, ttft_limit: float, tpot_limit: float) -> bool:
        ttft, tpot = self.ttft, self.tpot
        ok_reason = self.finish_reason in ("length", "stop")
        return ok_reason and ttft is not None and ttft <= ttft_limit and (tpot is None or tpot <= tpot_limit)


@dataclass(frozen=True)
class OwnMetrics:
    """Computed from the per-token times the harness recorded (independent of LoadGen's clock)."""

    ttft_s: LatencyStats
    tpot_s: LatencyStats
    duration_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    goodput_rps: float
    goodput_tokens_per_s: float
    good_requests: int


def own_metrics(records: Sequence[RequestRecord], ttft_limit: float, tpot_limit: float) -> OwnMetrics:
    answered = [r for r in records if r.token_times]
    ttfts = [r.ttft for r in answered]
    tpots = [r.tpot for r in answered if r.tpot is not None]
    if records:
        duration = max(r.done for r in records) - min(r.issued for r in records)
    else:
        duration = math.nan
    tokens = sum(r.tokens for r in records)
    good = [r for r in records if r.meets(ttft_limit, tpot_limit)]
    per_s = (lambda x: x / duration) if duration and duration > 0 else (lambda x: math.nan)
    return OwnMetrics(LatencyStats.of(ttfts), LatencyStats.of(tpots), duration, tokens, per_s(tokens),
                      per_s(len(records)), per_s(len(good)), per_s(sum(r.tokens for r in good)), len(good))


# ---------------------------------------------------------------- LoadGen's logs
_NS = 1e-9
_KEYS = {  # our name -> LoadGen detail-log key (values in ns unless named per_s)
    "ttft_p50": "result_first_token_50.00_percentile_latency_ns",
    "ttft_p90": "result_first_token_90.00_percentile_latency_ns",
    "ttft_p99": "result_first_token_99.00_percentile_latency_ns",
    "ttft_mean": "result_first_token_mean_latency_ns",
    "tpot_p50": "result_time_per_output_token_50.00_percentile_ns",
    "tpot_p90": "result_time_per_output_token_90.00_percentile_ns",
    "tpot_p99": "result_time_per_output_token_99.00_percentile_ns",
    "tpot_mean": "result_time_to_output_token_mean",
    "latency_p99": "result_99.00_percentile_latency_ns",
}


def read_loadgen_log(folder: str | Path) -> dict[str, Any]:
    """LoadGen's results from `mlperf_log_detail.txt` (its `:::MLLOG {json}` lines) in seconds, with the verdicts
    and the summary's "Result is" line from `mlperf_log_summary.txt`."""
    folder = Path(folder)
    detail = folder / "mlperf_log_detail.txt"
    if not detail.is_file():
        raise FileNotFoundError(f"LoadGen wrote no {detail.name} in {folder}")
    found: dict[str, Any] = {}
    errors: list[str] = []
    for line in detail.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            entry = json.loads(line[len(":::MLLOG "):])
        except json.JSONDecodeError:
            continue
        found[entry.get("key")] = entry.get("value")
        if entry.get("metadata", {}).get("is_error"):
            errors.append(f"{entry.get('key')}: {entry.get('value')}")
    out: dict[str, Any] = {k: found[v] * _NS for k, v in _KEYS.items() if isinstance(found.get(v), (int, float))}
    sps = found.get("result_completed_samples_per_sec", found.get("result_samples_per_second"))
    tps = found.get("result_completed_tokens_per_second", found.get("result_tokens_per_second"))
    out.update({"samples_per_s": sps, "tokens_per_s": tps, "validity": found.get("result_validity"),
                "perf_constraints_met": found.get("result_perf_constraints_met"),
                "early_stopping_met": found.get("early_stopping_met"),
                "queries": found.get("result_query_count"), "log_errors": errors})
    summary = folder / "mlperf_log_summary.txt"
    if summary.is_file():
        for line in summary.read_text(errors="replace").splitlines():
            if line.startswith("Result is"):
                out["summary_result"] = line.split(":", 1)[1].strip()
    return out


def agreement(own: OwnMetrics, loadgen: dict[str, Any]) -> dict[str, Any]:
    """How far LoadGen's TTFT/TPOT percentiles are from ours: per metric the absolute difference (ms) and the
    relative one; `max_rel` is the largest relative difference (None when LoadGen reported no token latencies)."""
    rows: dict[str, Any] = {}
    for metric, stats in (("ttft", own.ttft_s), ("tpot", own.tpot_s)):
        for name in ("p50", "p90", "p99"):
            theirs, ours = loadgen.get(f"{metric}_{name}"), getattr(stats, name)
            if theirs is None or not math.isfinite(ours):
                continue
            rel = abs(theirs - ours) / max(abs(theirs), 1e-9)
            rows[f"{metric}_{name}"] = {"ours_s": ours, "loadgen_s": theirs, "diff_ms": (theirs - ours) * 1e3,
                                        "rel": rel}
    worst = max((r["rel"] for r in rows.values()), default=None)
    return {"max_rel": worst, "metrics": rows}
