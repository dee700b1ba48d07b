"""One MLPerf LoadGen test (Offline or Server) over any `Backend`, in process.

LoadGen owns the clock and the arrivals: it calls `issue_queries` with samples (Offline: all at once; Server:
one at a time on a Poisson schedule at the target QPS, seeded, so every backend sees the same arrivals). Each
sample becomes one `backend.submit` (Offline: longest first, below); the backend's first token is reported with
`FirstTokenComplete` and the end with `QuerySamplesComplete(..., n_tokens)`, so LoadGen measures TTFT and TPOT
itself (`use_token_latencies`; it reports them for Server runs, tokens/s for both). The harness records every
token's time too (`server_metrics.RequestRecord`), from the moment LoadGen hands the sample over.

Offline submits the samples longest first (most new tokens, then the longest prompt), as MLPerf's Offline rules
let a system under test order the queries it is handed at once: a batching backend then ends with its slots full
of short requests rather than one long request decoding alone. Why: SmolLM2 on the engine at max_batch 8 (Xeon with
AMX, 2026-12-07, 32 requests), in LoadGen's order 113 of 354 engine calls served fewer than 8 requests, longest
first 23 of 299, and tokens/s rose 648 -> 718 in that run (4-10% over earlier ones; one request at a time gains
nothing: the order only moves its idle slots).

Bounded: a run issues at most `n_queries` samples and stops issuing after `max_duration_s`; requests still
running `drain_timeout_s` after that are cancelled (and count as failed), so a run always ends.
"""
from __future__ import annotations

import array
import itertools
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .backend import RequestHandle, SamplingParams, ServingError
from .samples import Sample
from .server_metrics import RequestRecord, read_loadgen_log

SCENARIOS = ("Offline", "Server")
_ONE_TEST = threading.Lock()  # LoadGen's logger and test state are process-global: one test at a time
_runs = itertools.count()


def require_loadgen() -> Any:
    try:
        import mlperf_loadgen
    except ImportError:  # pragma: no cover - in the `serving` extra
        raise ServingError("the server scenario needs MLPerf LoadGen: pip install 'optistack[loadgen]' "
                           "(mlcommons-loadgen)") from None
    return mlperf_loadgen


@dataclass(frozen=True)
class LoadGenRun:
    """What one test returned: the harness's records and LoadGen's own results (seconds)."""

    scenario: str
    target_qps: float | None
    records: tuple[RequestRecord, ...]
    loadgen: dict[str, Any]
    log_dir: str | None  # where LoadGen's logs were kept (None: a temporary folder, deleted)
    cancelled_at_deadline: int


class _SUT:
    """The system under test: LoadGen samples in, backend requests out, completions back to LoadGen."""

    def __init__(self, lg: Any, backend: Any, samples: Sequence[Sample], longest_first: bool = False) -> None:
        self.lg, self.backend, self.samples, self.longest_first = lg, backend, samples, longest_first
        self.run = next(_runs)
        self.lock = threading.Lock()
        self.open: dict[int, RequestHandle | None] = {}  # LoadGen query id -> handle (None: not submitted)
        self.issued: dict[int, float] = {}  # LoadGen query id -> when LoadGen handed it over
        self.first_sent: set[int] = set()
        self.records: list[RequestRecord] = []

    def issue_queries(self, query_samples: list[Any]) -> None:
        if self.longest_first:  # stable: ties stay in LoadGen's order
            query_samples = sorted(query_samples, key=lambda qs: (-self.samples[qs.index].max_new_tokens,
                                                                  -len(self.samples[qs.index].prompt_ids)))
        for qs in query_samples:
            sample = self.samples[qs.index]
            issued = time.perf_counter()
            with self.lock:
                self.open[qs.id], self.issued[qs.id] = None, issued
            params = SamplingParams(max_new_tokens=sample.max_new_tokens)
            try:
                handle = self.backend.submit(list(sample.prompt_ids), params, request_id=f"lg{self.run}-{qs.id}",
                                             on_token=lambda h, t, qid=qs.id: self._token(qid, h),
                                             on_done=lambda h, qid=qs.id: self._done(qid, h))
            except Exception as exc:  # noqa: BLE001 - LoadGen must hear of every sample, or it waits forever
                self._complete(qs.id, RequestRecord(issued, (), time.perf_counter(), "error", f"submit: {exc}"), [])
                continue
            with self.lock:
                if qs.id in self.open:  # not already finished on the backend's thread
                    self.open[qs.id] = handle

    def flush_queries(self) -> None:
        pass

    def _token(self, qid: int, handle: RequestHandle) -> None:
        if len(handle.tokens) == 1:
            with self.lock:
                self.first_sent.add(qid)
            data = array.array("i", handle.tokens[:1])
            addr, n = data.buffer_info()
            self.lg.FirstTokenComplete([self.lg.QuerySampleResponse(qid, addr, n * data.itemsize)])

    def _done(self, qid: int, handle: RequestHandle) -> None:
        record = RequestRecord(self.issued.get(qid, handle.submitted_at), tuple(handle.token_times), time.perf_counter(),
                               handle.finish_reason or "error", handle.error)
        self._complete(qid, record, list(handle.tokens))

    def _complete(self, qid: int, record: RequestRecord, tokens: list[int]) -> None:
        with self.lock:
            if qid not in self.open:
                return  # completed already (the deadline forced it)
            del self.open[qid]
            self.records.append(record)
            needs_first = qid not in self.first_sent
        data = array.array("i", tokens or [0])
        addr, n = data.buffer_info()
        if needs_first:  # a request that failed before its first token: LoadGen needs one, at the failure
            self.lg.FirstTokenComplete([self.lg.QuerySampleResponse(qid, addr, data.itemsize)])
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(qid, addr, n * data.itemsize, len(tokens))])

    def end_stragglers(self, grace_s: float = 10.0) -> int:
        """Cancel what is still running; after `grace_s`, complete what the backend did not end. Returns the count."""
        with self.lock:
            left = dict(self.open)
        for handle in left.values():
            if handle is not None:
                handle.cancel()
                cancel = getattr(self.backend, "cancel", None)
                if callable(cancel):
                    cancel(handle.request_id)
        deadline = time.perf_counter() + grace_s
        while time.perf_counter() < deadline:
            with self.lock:
                if not self.open:
                    return len(left)
            time.sleep(0.02)
        with self.lock:
            stuck = dict(self.open)
        for qid, handle in stuck.items():
            issued = handle.submitted_at if handle is not None else time.perf_counter()
            times = tuple(handle.token_times) if handle is not None else ()
            self._complete(qid, RequestRecord(issued, times, time.perf_counter(), "error",
                                              "the backend did not end the request after it was cancelled"),
                           list(handle.tokens) if handle is not None else [])
        return len(left)


def run_loadgen(backend: Any, samples: Sequence[Sample], scenario: str, *, n_queries: int, target_qps: float | None = None,
                max_duration_s: float = 60.0, drain_timeout_s: float = 60.0, ttft_limit_s: float = 2.0,
                tpot_limit_s: float = 0.1, seed: int = 0, log_dir: str | Path | None = None,
                longest_first: bool | None = None) -> LoadGenRun:
    """Run one LoadGen test of `n_queries` samples (each sample at most once) and return its records and results.
    `longest_first`: submit what LoadGen hands over at once longest first (default: for Offline; see above)."""
    if scenario not in SCENARIOS:
        raise ServingError(f"scenario must be one of {', '.join(SCENARIOS)}; got {scenario!r}")
    if not 1 <= n_queries <= len(samples):
        raise ServingError(f"n_queries must be within 1..{len(samples)} (the samples given); got {n_queries}")
    if scenario == "Server" and not (isinstance(target_qps, (int, float)) and target_qps > 0):
        raise ServingError(f"a Server run needs target_qps > 0; got {target_qps!r}")
    lg = require_loadgen()
    sut_state = _SUT(lg, backend, samples, scenario == "Offline" if longest_first is None else longest_first)
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.use_token_latencies = True  # Offline too: LoadGen then reports its tokens/s
    settings.min_duration_ms = 0
    settings.max_duration_ms = max(1, int(max_duration_s * 1000)) if scenario == "Server" else 0  # 0: no bound
    settings.min_query_count = settings.max_query_count = n_queries
    settings.performance_issue_unique = True
    settings.performance_sample_count_override = len(samples)
    settings.qsl_rng_seed = settings.sample_index_rng_seed = settings.schedule_rng_seed = seed
    if scenario == "Server":
        settings.server_target_qps = float(target_qps)
        settings.ttft_latency = int(ttft_limit_s * 1e9)
        settings.tpot_latency = int(tpot_limit_s * 1e9)
        settings.server_target_latency_ns = int(ttft_limit_s * 1e9)
    else:
        settings.offline_expected_qps = float(n_queries)
    keep = Path(log_dir) if log_dir is not None else None
    with _ONE_TEST, tempfile.TemporaryDirectory(prefix="optistack-loadgen-") as tmp:
        out = keep if keep is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        log = lg.LogSettings()
        log.log_output.outdir = str(out)
        log.log_output.copy_summary_to_stdout = False
        log.enable_trace = False
        stop = threading.Event()
        stragglers = [0]

        def watchdog() -> None:
            if not stop.wait(max_duration_s + drain_timeout_s):
                stragglers[0] = sut_state.end_stragglers()

        guard = threading.Thread(target=watchdog, daemon=True, name="optistack-loadgen-deadline")
        sut = lg.ConstructSUT(sut_state.issue_queries, sut_state.flush_queries)
        qsl = lg.ConstructQSL(len(samples), len(samples), lambda _: None, lambda _: None)
        try:
            guard.start()
            lg.StartTestWithLogSettings(sut, qsl, settings, log)
        finally:
            stop.set()
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)
        guard.join(timeout=30)
        results = read_loadgen_log(out)
    return LoadGenRun(scenario, float(target_qps) if scenario == "Server" else None, tuple(sut_state.records), results,
                      str(keep) if keep is not None else None, stragglers[0])
