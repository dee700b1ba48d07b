"""MLPerf LoadGen Offline and Server runs over a real backend (StockBackend on a tiny random Llama)."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("mlperf_loadgen")

from optistack.serving.backend import SamplingParams, ServingError  # noqa: E402
from optistack.serving.loadgen_scenario import (  # noqa: E402
    ScenarioOptions,
    ScenarioResult,
    find_max_qps,
    measure_offline,
    measure_server,
    run_scenario,
    warm_up,
)
from optistack.serving.samples import samples_from_ids, samples_from_prompts  # noqa: E402
from optistack.serving.scenario_plot import plot_scenario  # noqa: E402
from optistack.serving.scenario_render import render_text  # noqa: E402
from optistack.serving.server_metrics import percentile  # noqa: E402
from optistack.serving.stock import StockBackend  # noqa: E402

IN, OUT = (8, 40), (6, 20)


@pytest.fixture(scope="module")
def samples():
    ids = torch.randint(0, 100, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    return samples_from_ids(ids, 8, seed=1, input_tokens=IN, output_tokens=OUT)


def _options(**kw):
    base = dict(samples=8, server_samples=8, max_run_s=20, drain_timeout_s=20, input_tokens=IN, output_tokens=OUT)
    return ScenarioOptions(**(base | kw))


def _ordered(stats):
    return stats.p50 <= stats.p90 <= stats.p99 <= stats.max


def test_samples_vary_within_their_ranges_and_repeat_with_the_seed():
    ids = list(range(1000))
    a = samples_from_ids(ids, 50, seed=3, input_tokens=(32, 512), output_tokens=(16, 128))
    assert a == samples_from_ids(ids, 50, seed=3, input_tokens=(32, 512), output_tokens=(16, 128))
    assert a != samples_from_ids(ids, 50, seed=4, input_tokens=(32, 512), output_tokens=(16, 128))
    assert all(32 <= len(s.prompt_ids) <= 512 and 16 <= s.max_new_tokens <= 128 for s in a)
    assert len({len(s.prompt_ids) for s in a}) > 10 and len({s.max_new_tokens for s in a}) > 10
    for s in a:  # a window of the stream: consecutive ids
        assert list(s.prompt_ids) == list(range(s.prompt_ids[0], s.prompt_ids[0] + len(s.prompt_ids)))
    cycled = samples_from_prompts([[1, 2], [3, 4, 5]], 5, seed=0, output_tokens=(4, 4))
    assert sorted({s.prompt_ids for s in cycled}) == [(1, 2), (3, 4, 5)] and {s.max_new_tokens for s in cycled} == {4}
    with pytest.raises(ServingError, match="input_tokens must be"):
        samples_from_ids(ids, 2, input_tokens=(10, 5))
    with pytest.raises(ServingError, match="fewer than input_tokens' lower bound 32"):
        samples_from_ids(ids[:10], 2)


@pytest.mark.parametrize("kw, words", [
    ({"ttft_limit_s": 0}, "ttft_limit_s must be a number > 0"),
    ({"samples": 4, "server_samples": 8}, "server_samples \\(8\\) must be <= samples \\(4\\)"),
    ({"qps_min": 2.0, "qps_max": 1.0}, "qps_min \\(2.0\\) must be <= qps_max"),
    ({"output_tokens": (1, 8)}, "output_tokens must be \\(lo, hi\\) integers with 2 <= lo <= hi"),
    ({"input_tokens": (64, 32)}, "input_tokens must be"),
    ({"search_steps": 1.5}, "search_steps must be an integer"),
])
def test_options_are_validated(kw, words):
    with pytest.raises(ServingError, match=words):
        _options(**kw)


def test_offline_and_server_runs_answer_every_sample_and_agree_with_loadgen(model, samples):
    options = _options()
    with StockBackend(model, max_batch=4, max_context=64) as backend:
        warm_up(backend, samples)
        offline = measure_offline(backend, samples, options)
        server = measure_server(backend, samples, 40.0, options)
    assert offline.issued == offline.answered == 8 and offline.failed == 0
    assert offline.tokens == sum(s.max_new_tokens for s in samples)  # no stop tokens: every answer is full length
    assert offline.loadgen["samples_per_s"] > 0 and offline.loadgen["tokens_per_s"] > 0
    assert server.issued == server.answered == 8 and server.failed == 0 and server.offered_qps == 40.0
    for run in (offline, server):
        assert _ordered(run.ttft_s) and _ordered(run.tpot_s)
        assert math.isclose(run.tokens_per_s * run.duration_s, run.tokens)
    # LoadGen measured the same requests: its TTFT/TPOT percentiles are ours within its issue overhead
    assert set(server.agreement["metrics"]) == {f"{m}_{p}" for m in ("ttft", "tpot") for p in ("p50", "p90", "p99")}
    for name, row in server.agreement["metrics"].items():
        assert abs(row["diff_ms"]) <= 20 or row["rel"] <= 0.10, (name, row)
    lg = server.loadgen
    assert lg["ttft_p50"] <= lg["ttft_p90"] <= lg["ttft_p99"] and lg["tpot_p50"] <= lg["tpot_p90"] <= lg["tpot_p99"]
    assert server.meets_limits is (lg["ttft_p99"] <= 2.0 and lg["tpot_p99"] <= 0.1)
    assert server.meets_limits == lg["perf_constraints_met"]  # our verdict is LoadGen's


class _Recording(StockBackend):
    """The stock backend, noting what was submitted in which order."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.order = []

    def submit(self, prompt_ids, params, **kw):
        self.order.append((params.max_new_tokens, len(prompt_ids)))
        return super().submit(prompt_ids, params, **kw)


@pytest.mark.parametrize("longest_first", [True, False])
def test_offline_submits_the_longest_requests_first_unless_told_not_to(model, samples, longest_first):
    """Offline hands every sample over at once; the SUT submits them by most new tokens, then longest prompt (so a
    batch does not end with one long request decoding alone), or in LoadGen's order when asked."""
    with _Recording(model, max_batch=4, max_context=64) as backend:
        run = measure_offline(backend, samples, _options(), longest_first=longest_first)
    assert run.answered == len(samples) and sorted(backend.order) == sorted((s.max_new_tokens, len(s.prompt_ids))
                                                                            for s in samples)
    by_length = sorted(backend.order, key=lambda o: (-o[0], -o[1]))
    assert (backend.order == by_length) is longest_first  # LoadGen's own order is shuffled (seeded): not sorted


def test_percentiles_come_from_the_per_token_times_recorded(model, samples):
    from optistack.serving.loadgen_sut import run_loadgen
    from optistack.serving.server_metrics import own_metrics

    with StockBackend(model, max_batch=4, max_context=64) as backend:
        run = run_loadgen(backend, samples, "Server", n_queries=8, target_qps=50.0, max_duration_s=20, drain_timeout_s=20)
    assert len(run.records) == 8 and all(r.tokens >= 6 for r in run.records)
    ttfts = [r.token_times[0] - r.issued for r in run.records]
    tpots = [(r.token_times[-1] - r.token_times[0]) / (r.tokens - 1) for r in run.records]
    own = own_metrics(run.records, 2.0, 0.1)
    assert own.ttft_s.p99 == max(ttfts) and own.ttft_s.p50 == sorted(ttfts)[4] == percentile(ttfts, 0.5)
    assert own.tpot_s.p90 == sorted(tpots)[7] and own.tpot_s.p50 == sorted(tpots)[4]


def test_qps_search_finds_a_qps_that_meets_the_limits_and_one_above_that_does_not(model, samples):
    # one request at a time: far above capacity the queue makes TTFT many service times long, far below it does not
    with StockBackend(model, max_batch=1, max_context=64) as backend:
        warm_up(backend, samples)
        alone = []
        for _ in range(3):  # one whole request, alone
            h = backend.submit(list(samples[0].prompt_ids), SamplingParams(max_new_tokens=max(OUT)))
            h.wait(30)
            alone.append(h.token_times[-1] - h.submitted_at)
        service = sorted(alone)[1]
        options = _options(ttft_limit_s=2.5 * service, tpot_limit_s=1.0, search_steps=2)
        hi, lo = 20 / service, 0.25 / service  # hi: all 8 arrive within half a service time; lo: 4 apart on average
        runs, good, bad = find_max_qps(backend, samples, options, hi, qps_lo=lo)
    assert [r.offered_qps for r in runs] == [lo, hi]  # the low end first, then the high end
    assert good is not None and lo <= good <= hi
    passing = next(r for r in runs if r.offered_qps == good)
    assert passing.meets_limits and passing.loadgen["ttft_p99"] <= options.ttft_limit_s
    assert bad is not None and bad > good
    failing = next(r for r in runs if r.offered_qps == bad)
    assert failing.meets_limits is False and failing.loadgen["ttft_p99"] > options.ttft_limit_s


def test_a_whole_scenario_gives_json_tables_and_the_plot(model, samples, tmp_path):
    options = _options(search_steps=2, qps_max=40.0, qps_min=8.0, log_dir=str(tmp_path / "logs"))
    results = []
    for role in ("stock", "optimized"):
        with StockBackend(model, max_batch=4, max_context=64, name=f"{role}-tiny") as backend:
            results.append(run_scenario(backend, samples, options, role=role))
    result = ScenarioResult(options, {"count": 8}, tuple(results))
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["schema"] == "optistack.scenario/1" and [b["role"] for b in d["backends"]] == ["stock", "optimized"]
    for b in d["backends"]:
        assert b["qps_range"] == [8.0, 40.0] and [r["offered_qps"] for r in b["server_runs"]][0] == 8.0
        assert b["max_qps"] is None or 8.0 <= b["max_qps"] <= 40.0
    assert set(d["ratio"]) == {"max_qps", "max_qps_ratio_is", "offline_tokens_per_s", "tokens_per_s_at_max_qps",
                               "goodput_rps_at_max_qps"}
    off = [b["offline"]["tokens_per_s"] for b in d["backends"]]
    assert d["ratio"]["offline_tokens_per_s"] == pytest.approx(off[1] / off[0])
    assert (tmp_path / "logs" / "stock-offline" / "mlperf_log_detail.txt").is_file()  # LoadGen's own logs, kept
    text = render_text(d)
    assert "max QPS within limits" in text and "Offline tokens/s (LoadGen)" in text and "optimized vs stock" in text
    png = plot_scenario(result, tmp_path / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
