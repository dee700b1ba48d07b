"""End-to-end on the bundled MiniLM: the headline pipeline, the gate, and the README's demo."""
import math

import pytest
import torch

import optistack as ost
from optistack.bench.timer import TimingConfig

pytestmark = pytest.mark.slow
QUICK = TimingConfig(warmup=2, min_rounds=6, max_rounds=8, max_seconds=3)  # figures, not precise ones


@pytest.fixture(scope="module")
def minilm():
    return ost.workloads.load("minilm")


def test_int8_dynamic_then_compile_keeps_cosine_and_reports_every_figure(minilm):
    result = ost.Pipeline.parse("int8-dynamic,compile").run(minilm, max_accuracy_drop=0.01, timing=QUICK,
                                                           verbose=False)
    steps = result.report.steps
    assert [s.status for s in steps] == ["applied", "applied"], [s.reason for s in steps]
    final = steps[-1]
    assert final.accuracy.after >= 0.99  # mean embedding cosine to the fp32 model
    assert final.accuracy.extra["retrieval_top1"] >= 0.95
    # every figure is a measured number, not a placeholder: a speedup with a real (finite, non-empty)
    # bootstrap interval, ordered latency percentiles, a cumulative speedup with its own interval, and
    # a first call that includes compilation (far slower than a warm call)
    lo, hi = final.speedup["ci95"]
    assert math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi, final.speedup
    lat = final.latency_ms
    assert 0 < lat["median"] <= lat["p90"] <= lat["p99"], lat
    assert final.cumulative_speedup > 0 and final.cumulative_ci95[0] < final.cumulative_ci95[1]
    assert final.first_call_ms > 5 * lat["median"], (final.first_call_ms, lat["median"])
    # int8 Linear weights (the fp32 word embeddings, half of MiniLM, stay as they are): 90.9 MB -> ~59 MB
    assert steps[0].model_bytes < result.report.baseline["model_bytes"] * 0.7
    out = minilm.run(result.model)  # the optimized model is usable like the original
    assert out.last_hidden_state.shape == (8, 128, 384)


def test_the_original_model_is_untouched_and_structured_pruning_is_gated(minilm):
    before = {k: v.clone() for k, v in minilm.model.state_dict().items()}
    result = ost.Pipeline.parse("prune-structured{sparsity=0.5},identity").run(
        minilm, max_accuracy_drop=0.01, timing=QUICK, verbose=False)
    pruned, identity = result.report.steps
    assert pruned.status == "rejected" and "exceeds the budget" in pruned.reason
    assert pruned.info["params_after"] < pruned.info["params_before"]
    assert identity.status == "applied"
    assert identity.accuracy.after == pytest.approx(1.0, abs=1e-6)
    after = minilm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
