"""The benchmark's timing cannot be gamed by caching, and a pass that changes nothing reads as such."""
from __future__ import annotations

import pytest
import torch

import optistack as ost
from optistack.bench.stats import NO_CHANGE
from optistack.bench.timer import TimingConfig
from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import register_pass, unregister_pass

FAST = TimingConfig(warmup=1, min_rounds=6, max_rounds=20, max_seconds=5)


class CacheByBytes(torch.nn.Module):
    """Returns the stored output for an input whose bytes it has seen before: the trick the
    benchmark must not reward."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.cache: dict[bytes, torch.Tensor] = {}
        self.hits: list[bytes] = []

    def forward(self, x):
        key = x.detach().cpu().numpy().tobytes()
        out = self.cache.get(key)
        if out is None:
            out = self.cache[key] = self.inner(x)
        else:
            self.hits.append(key)
        return out


class CachePass(ConfiguredPass):
    name = "test-cache"

    def apply(self, model, ctx):
        return PassResult(CacheByBytes(model))


@pytest.fixture(scope="module", autouse=True)
def cache_pass():
    register_pass(CachePass)
    yield
    unregister_pass(CachePass.name)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a machine shared with other jobs, two threads wait on each other at
    every barrier (a 0.5 ms forward then takes 100+ ms at random), which no statistic can rescue."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp():
    torch.manual_seed(0)
    # big enough that a cache hit (hashing 64 KB) would be many times faster than the forward
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).eval()


def test_a_caching_pass_gains_nothing_and_is_scored_on_untimed_data():
    x = torch.randn(64, 256)
    evals = [torch.randn(64, 256) for _ in range(2)]
    result = ost.optimize(mlp(), x, "test-cache", eval_inputs=evals, timing=FAST, verbose=False)
    step = result.report.steps[0]
    assert step.status == "applied"
    sp = step.speedup
    assert sp["ci95"][0] <= 1.0 <= sp["ci95"][1] or sp["median"] < 1.25, sp  # was ~90x on one repeated batch
    # no timed batch ever came back; the only repeat allowed is the gate's finiteness check of the
    # user's example after it was scored (untimed, and the cache then holds the true outputs)
    assert set(result.model.hits) <= {x.numpy().tobytes()}, "a timed batch repeated: a cache could answer from memory"
    assert step.accuracy.after == 0.0  # scored on the user's inputs, which the cache had never seen
    timing = result.report.timing
    assert "fresh batch per call" in timing["batches"]


def test_identity_is_no_measurable_change_run_after_run():
    verdicts = []
    for _ in range(4):
        result = ost.optimize(mlp(), torch.randn(64, 256), "identity", timing=FAST, verbose=False)
        sp = result.report.steps[0].speedup
        verdicts.append((sp["verdict"], sp["median"], sp["ci95"], sp["noise_floor"]))
    assert all(v[0] == NO_CHANGE for v in verdicts), verdicts


def test_the_report_carries_the_noise_floor_and_how_it_was_measured():
    result = ost.optimize(mlp(), torch.randn(64, 256), "identity", timing=FAST, verbose=False)
    nf = result.report.baseline["noise_floor"]
    assert nf["reference"] == "a deep copy of the original" and nf["rounds"] >= FAST.min_rounds
    assert nf["floor"] >= 0 and len(nf["aa_speedup"]["ci95"]) == 2
    assert result.report.timing["noise_floor"] == nf["floor"]
    assert result.report.timing["block"] == FAST.block and "blocks of" in result.report.timing["method"]
    step, base = result.report.steps[0], result.report.baseline
    assert step.latency_ms["n"] >= FAST.min_rounds * (FAST.block - 1)  # every steady call, the first of a block apart
    assert step.latency_ms["first_call_after_switch_ms"] > 0 and base["latency_ms"]["first_call_after_switch_ms"] > 0
    d = result.report.to_dict()
    assert d["steps"][0]["speedup"]["verdict"] in ("faster", "slower", NO_CHANGE)


def test_renderers_say_no_measurable_change():
    from optistack.bench.render.markdown import render_markdown
    from optistack.bench.report import Report, Step

    step = Step("identity", {}, "identity", speedup={"median": 0.986, "ci95": [0.974, 0.997],
                                                     "verdict": NO_CHANGE, "noise_floor": 0.03})
    report = Report(workload={"name": "w"}, pipeline="identity", machine={}, versions={}, baseline={}, steps=[step])
    assert "0.99x [0.97, 1.00] (no measurable change)" in render_markdown(report)
    step.speedup = {"median": 1.5, "ci95": [1.4, 1.6], "verdict": "faster", "noise_floor": 0.03}
    assert "no measurable change" not in render_markdown(report)


def test_noise_floor_can_be_turned_off():
    cfg = TimingConfig(warmup=1, min_rounds=3, max_rounds=3, noise_floor=False)
    result = ost.optimize(mlp(), torch.randn(8, 256), "identity", timing=cfg, verbose=False)
    assert result.report.baseline["noise_floor"] is None
    assert result.report.steps[0].speedup["noise_floor"] == 0.0



def test_batches_never_repeat_across_streams_and_a_repeating_stream_says_so():
    from optistack.bench.ab_timing import BatchStream
    from optistack.core.workload import batch_digest
    from optistack.workloads import GenericWorkload

    wl = GenericWorkload(mlp(), torch.randn(4, 256))
    first, second = BatchStream(wl), BatchStream(wl)  # e.g. a search trial after the baseline run
    seen = [batch_digest(s()) for s in (first, second) for _ in range(5)]
    assert len(set(seen)) == 10 and "never repeated" in first.describe()

    class OneBatch:
        name = "one"

        def timing_batch(self, index):
            return (torch.ones(2),), {}

    stream = BatchStream(OneBatch())
    stream(), stream()
    assert stream.repeats == 1 and "not fully excluded" in stream.describe()


def test_one_workload_keeps_its_reference_copy_until_the_setting_changes():
    from optistack.workloads import GenericWorkload

    wl = GenericWorkload(mlp(), torch.randn(8, 256))
    quick = dict(warmup=1, min_rounds=3, max_rounds=3)
    pipe = ost.Pipeline.parse("identity")
    on = pipe.run(wl, timing=TimingConfig(**quick), verbose=False)
    off = pipe.run(wl, timing=TimingConfig(**quick, noise_floor=False), verbose=False)
    assert on.report.timing["reference"] == "a deep copy of the original"
    assert off.report.timing["reference"] == "the original itself (noise_floor=False)"
