"""MLPerf-style Offline and Server scenarios over any `Backend`, and the highest QPS within latency limits.

- Offline: every sample issued at once; the number is throughput (tokens/s, samples/s).
- Server: Poisson arrivals at an offered QPS; TTFT and TPOT at p50/p90/p99, tokens/s and goodput.
- `find_max_qps`: a bounded search over QPS for the highest offered QPS whose Server run keeps p99 TTFT <=
  `ttft_limit_s` and p99 TPOT <= `tpot_limit_s` (MLPerf's Llama-3.1-8B limits by default: 2 s and 0.1 s)
  with every request answered. It probes the low end first (if that fails, nothing passes), then the high
  end (default: the Offline throughput, which no Server run can exceed), then bisects geometrically.

Every run is bounded (`ScenarioOptions`: samples per run, seconds per run, drain timeout), so a search is
`search_steps` Server runs of at most `max_run_s + drain_timeout_s` each. The schema of `to_dict()` is
documented in docs/serving-under-load.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .backend import SamplingParams, ServingError
from .loadgen_sut import LoadGenRun, run_loadgen
from .samples import DEFAULT_INPUT_TOKENS, DEFAULT_OUTPUT_TOKENS, Sample
from .server_metrics import LatencyStats, agreement, own_metrics

SCHEMA = "optistack.scenario/1"
GOODPUT = "requests/s that met both limits (TTFT <= ttft_limit_s and TPOT <= tpot_limit_s); tokens/s of them beside"


@dataclass(frozen=True)
class ScenarioOptions:
    """Limits and bounds of the scenario; every field is validated (one ServingError per bad value)."""

    ttft_limit_s: float = 2.0
    tpot_limit_s: float = 0.1
    samples: int = 16  # requests built from the workload; a run issues each at most once
    server_samples: int = 12  # requests per Server run (<= samples)
    max_run_s: float = 30.0  # a Server run stops issuing after this
    drain_timeout_s: float = 60.0  # then requests still running after this are cancelled (and fail the run)
    offline_timeout_s: float = 300.0  # the Offline run's requests still running after this are cancelled
    qps_min: float | None = None  # default: qps_max / 8
    qps_max: float | None = None  # default: the Offline run's samples/s
    search_steps: int = 4  # Server runs in the QPS search (>= 1)
    seed: int = 0  # the samples and LoadGen's arrival schedule
    input_tokens: tuple[int, int] = DEFAULT_INPUT_TOKENS
    output_tokens: tuple[int, int] = DEFAULT_OUTPUT_TOKENS
    max_batch: int = 8
    log_dir: str | None = None  # keep LoadGen's logs here (one folder per run); None: temporary

    def __post_init__(self) -> None:
        def positive(name: str, integer: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not ok or v <= 0:
                kind = "an integer >= 1" if integer else "a number > 0"
                raise ServingError(f"{name} must be {kind}; got {v!r}")

        for name in ("ttft_limit_s", "tpot_limit_s", "max_run_s", "drain_timeout_s", "offline_timeout_s"):
            positive(name)
        for name in ("samples", "server_samples", "search_steps", "max_batch"):
            positive(name, integer=True)
        for name in ("qps_min", "qps_max"):
            if getattr(self, name) is not None:
                positive(name)
        if self.server_samples > self.samples:
            raise ServingError(f"server_samples ({self.server_samples}) must be <= samples ({self.samples})")
        if self.qps_min is not None and self.qps_max is not None and self.qps_min > self.qps_max:
            raise ServingError(f"qps_min ({self.qps_min}) must be <= qps_max ({self.qps_max})")
        for name, low in (("input_tokens", 1), ("output_tokens", 2)):  # TPOT needs two tokens
            v = getattr(self, name)
            ok = isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            if not (ok and low <= v[0] <= v[1]):
                raise ServingError(f"{name} must be (lo, hi) integers with {low} <= lo <= hi; got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_tokens"], d["output_tokens"] = list(self.input_tokens), list(self.output_tokens)
        return d


@dataclass(frozen=True)
class LoadRun:
    """One Offline or Server run, measured by LoadGen and by the harness's per-token times (seconds)."""

    scenario: str
    offered_qps: float | None
    issued: int
    answered: int  # finished normally (length or stop)
    failed: int
    duration_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    goodput_rps: float
    goodput_tokens_per_s: float
    meets_limits: bool | None  # Server: p99 TTFT and TPOT (LoadGen's) within limits, every request answered
    loadgen: dict[str, Any]
    agreement: dict[str, Any]
    log_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ttft_s"], d["tpot_s"] = self.ttft_s.to_dict(), self.tpot_s.to_dict()
        return d


@dataclass(frozen=True)
class BackendScenario:
    """Everything measured on one backend: its Offline run, the Server runs of the search, the max QPS."""

    name: str
    role: str  # "stock", "optimized", or what the caller calls it
    backend: dict[str, Any]
    offline: LoadRun
    server_runs: tuple[LoadRun, ...]
    qps_range: tuple[float, float]
    max_qps: float | None  # the highest offered QPS whose run met the limits (None: none did)
    first_failing_qps: float | None  # the lowest probed QPS above max_qps that did not

    @property
    def best_run(self) -> LoadRun | None:
        return next((r for r in self.server_runs if r.offered_qps == self.max_qps), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "backend": self.backend, "offline": self.offline.to_dict(),
                "server_runs": [r.to_dict() for r in self.server_runs], "qps_range": list(self.qps_range),
                "max_qps": self.max_qps, "first_failing_qps": self.first_failing_qps}


@dataclass(frozen=True)
class ScenarioResult:
    """The server scenario on one or more backends (the first is the reference for the ratios)."""

    options: ScenarioOptions
    samples: dict[str, Any]  # how the requests were built
    backends: tuple[BackendScenario, ...]
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def ratios(self) -> dict[str, float | None]:
        """Last backend over first (> 1: the last does more): max QPS within limits, Offline tokens/s, and tokens/s and
        goodput at each one's max QPS (capacities; latencies at two different loads are not compared)."""
        if len(self.backends) < 2:
            return {}
        a, b = self.backends[0], self.backends[-1]

        def ratio(x: float | None, y: float | None) -> float | None:
            ok = x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and x > 0
            return y / x if ok else None

        ra, rb = a.best_run, b.best_run
        top_a, top_b = (x.max_qps is not None and x.max_qps >= x.qps_range[1] for x in (a, b))
        # a max QPS at the top of its range is a lower bound (the search found no failing QPS above it)
        bound = {(False, False): "exact", (False, True): "at_least", (True, False): "at_most"}.get((top_a, top_b))
        return {"max_qps": ratio(a.max_qps, b.max_qps), "max_qps_ratio_is": bound,
                "offline_tokens_per_s": ratio(a.offline.tokens_per_s, b.offline.tokens_per_s),
                "tokens_per_s_at_max_qps": ratio(ra.tokens_per_s if ra else None, rb.tokens_per_s if rb else None),
                "goodput_rps_at_max_qps": ratio(ra.goodput_rps if ra else None, rb.goodput_rps if rb else None)}

    def to_dict(self) -> dict[str, Any]:
        from ..bench.report import _finite  # JSON has no NaN: null, as the report writes it

        return _finite({"schema": self.schema, "scenario": "server", "options": self.options.to_dict(),
                        "limits": {"ttft_s": self.options.ttft_limit_s, "tpot_s": self.options.tpot_limit_s,
                                   "percentile": 0.99},
                        "goodput": GOODPUT, "samples": self.samples,
                        "backends": [b.to_dict() for b in self.backends], "ratio": self.ratios(), **self.extra})


# ------------------------------------------------------------------ runs
def _load_run(run: LoadGenRun, options: ScenarioOptions) -> LoadRun:
    own = own_metrics(run.records, options.ttft_limit_s, options.tpot_limit_s)
    answered = sum(1 for r in run.records if r.finish_reason in ("length", "stop"))
    failed = len(run.records) - answered
    meets = None
    if run.scenario == "Server":
        ttft99 = run.loadgen.get("ttft_p99", own.ttft_s.p99)
        tpot99 = run.loadgen.get("tpot_p99", own.tpot_s.p99)
        meets = bool(failed == 0 and answered > 0 and ttft99 <= options.ttft_limit_s and tpot99 <= options.tpot_limit_s)
    loadgen = dict(run.loadgen, cancelled_at_deadline=run.cancelled_at_deadline)
    return LoadRun(run.scenario, run.target_qps, len(run.records), answered, failed, own.duration_s, own.tokens,
                   own.tokens_per_s, own.requests_per_s, own.ttft_s, own.tpot_s, own.goodput_rps,
                   own.goodput_tokens_per_s, meets, loadgen, agreement(own, run.loadgen), run.log_dir)


def _log_dir(options: ScenarioOptions, label: str) -> str | None:
    return None if options.log_dir is None else f"{options.log_dir}/{label}"


def check_samples(backend: Any, samples: Sequence[Sample]) -> None:
    if not samples:
        raise ServingError("no samples to run")
    longest = max(samples, key=lambda s: s.context)
    if longest.context > backend.max_context:
        raise ServingError(f"a sample needs {longest.context} tokens ({len(longest.prompt_ids)} prompt + "
                           f"{longest.max_new_tokens} new) but backend {backend.name!r} holds {backend.max_context}; "
                           "give the backend a larger max_context or shorter input_tokens/output_tokens")


def warm_up(backend: Any, samples: Sequence[Sample], timeout_s: float = 120.0) -> None:
    """One short request first, so first-call costs (allocation, lazy init) are not in a measured run."""
    handle = backend.submit(list(samples[0].prompt_ids[:16]), SamplingParams(max_new_tokens=4))
    if not handle.wait(timeout_s) or handle.finish_reason == "error":
        raise ServingError(f"backend {backend.name!r} failed its warm-up request: {handle.error or 'timed out'}")


def measure_offline(backend: Any, samples: Sequence[Sample], options: ScenarioOptions, label: str = "offline",
                    longest_first: bool = True) -> LoadRun:
    """`longest_first`: the samples submitted longest first (loadgen_sut.py), else in LoadGen's order."""
    run = run_loadgen(backend, samples, "Offline", n_queries=len(samples), max_duration_s=0.0,
                      drain_timeout_s=options.offline_timeout_s, seed=options.seed, log_dir=_log_dir(options, label),
                      ttft_limit_s=options.ttft_limit_s, tpot_limit_s=options.tpot_limit_s, longest_first=longest_first)
    return _load_run(run, options)


def measure_server(backend: Any, samples: Sequence[Sample], qps: float, options: ScenarioOptions,
                   label: str | None = None) -> LoadRun:
    run = run_loadgen(backend, samples, "Server", n_queries=options.server_samples, target_qps=qps,
                      max_duration_s=options.max_run_s, drain_timeout_s=options.drain_timeout_s, seed=options.seed,
                      ttft_limit_s=options.ttft_limit_s, tpot_limit_s=options.tpot_limit_s,
                      log_dir=_log_dir(options, label or f"server-{qps:.4g}qps"))
    return _load_run(run, options)


def find_max_qps(backend: Any, samples: Sequence[Sample], options: ScenarioOptions, qps_hi: float,
                 qps_lo: float | None = None, label: str = "") -> tuple[list[LoadRun], float | None, float | None]:
    """Server runs (in the order probed), the highest passing offered QPS, the lowest failing one above it."""
    lo = qps_lo if qps_lo is not None else qps_hi / 8
    lo, hi = min(lo, qps_hi), qps_hi
    runs: list[LoadRun] = []

    def probe(qps: float) -> bool:
        runs.append(measure_server(backend, samples, qps, options, label=f"{label}server-{qps:.4g}qps"))
        return bool(runs[-1].meets_limits)

    good, bad = None, None
    if probe(lo):
        good = lo
        if len(runs) < options.search_steps and hi > lo:
            if probe(hi):
                good = hi
            else:
                bad = hi
        while good is not None and bad is not None and len(runs) < options.search_steps:
            mid = math.sqrt(good * bad)
            if probe(mid):
                good = mid
            else:
                bad = mid
    else:
        bad = lo
    return runs, good, bad


def run_scenario(backend: Any, samples: Sequence[Sample], options: ScenarioOptions, *, role: str = "backend",
                 warmup: bool = True) -> BackendScenario:
    """Warm up, the Offline run, then the QPS search between qps_min and qps_max (default: the Offline run's answered
    requests per second, an upper bound: no Server run sustains more than the backend does with everything queued)."""
    check_samples(backend, samples)
    if warmup:
        warm_up(backend, samples)
    label = f"{role}-"
    offline = measure_offline(backend, samples, options, label=f"{label}offline")
    answered_per_s = offline.answered / offline.duration_s if offline.duration_s > 0 else math.nan
    hi = options.qps_max if options.qps_max is not None else answered_per_s
    if not (isinstance(hi, (int, float)) and math.isfinite(hi) and hi > 0):
        raise ServingError(f"backend {backend.name!r}: the Offline run answered {offline.answered} of {offline.issued} "
                           f"requests within offline_timeout_s={options.offline_timeout_s:g}; cannot choose a QPS range "
                           "(give qps_max, or a longer offline_timeout_s)")
    lo = options.qps_min if options.qps_min is not None else hi / 8
    runs, good, bad = find_max_qps(backend, samples, options, hi, min(lo, hi), label=label)
    describe = backend.describe() if callable(getattr(backend, "describe", None)) else {
        "kind": type(backend).__name__, "max_batch": getattr(backend, "max_batch", None), "max_context": backend.max_context}
    return BackendScenario(getattr(backend, "name", type(backend).__name__), role, describe, offline, tuple(runs),
                           (min(lo, hi), hi), good, bad)
