"""MiniLM workload on the real bundled model: the original scores 1.0, damage scores lower, every
call has the benchmark batch's shape, and calibration never touches the eval sentences."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from optistack.workloads import Workload, load
from optistack.workloads.minilm import MiniLMWorkload, hidden_states


@pytest.fixture(scope="module")
def wl():
    return load("minilm")


def test_hidden_states_reads_every_output_form():
    h = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    for out in (h, (h, None), [h], {"last_hidden_state": h}):
        got = hidden_states(out)
        assert got.dtype == torch.float32 and torch.equal(got, h.float())


@pytest.mark.slow
def test_original_scores_perfectly(wl):
    assert isinstance(wl, Workload) and isinstance(wl, MiniLMWorkload)
    assert wl.metric.name == "cosine" and wl.metric.higher_is_better
    scores = wl.evaluate(wl.model)
    assert scores["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cosine_min"] > 0.9999 and scores["retrieval_top1"] == 1.0
    info = wl.describe()
    assert info["eval_sentences"] >= 64 and info["batch_shape"] == [8, 128] and 22e6 < info["params"] < 23e6


@pytest.mark.slow
def test_noisy_weights_score_lower_and_bf16_stays_close(wl):
    noisy = copy.deepcopy(wl.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.1)
    assert wl.evaluate(noisy)["cosine"] < 0.99
    bf16 = copy.deepcopy(wl.model).to(torch.bfloat16)
    assert wl.evaluate(bf16)["cosine"] > 0.99


@pytest.mark.slow
def test_every_call_has_the_benchmark_shape_and_callables_work(wl):
    shapes = set()

    def as_tuple(**kw):  # a plain callable returning a tuple, like an exported model
        shapes.add(tuple(kw["input_ids"].shape))
        return wl.model(**kw, return_dict=False)

    assert wl.run(wl.model).last_hidden_state.shape == (8, 128, 384)
    assert wl.run(as_tuple)[0].shape == (8, 128, 384)
    assert wl.evaluate(as_tuple)["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert shapes == {(8, 128)}
    nan = wl.evaluate(lambda **kw: torch.full((8, 128, 384), math.nan))
    assert all(math.isnan(v) for v in nan.values())


@pytest.mark.slow
def test_calibration_is_separate_from_eval(wl):
    batches = list(wl.calibration_inputs(100))
    assert 1 <= len(batches) <= 100 and len(list(wl.calibration_inputs(2))) == 2
    for args, kwargs in batches:
        assert args == () and kwargs["input_ids"].shape == (8, 128)
        assert set(kwargs) <= {"input_ids", "attention_mask", "token_type_ids"}
    assert not set(wl.calib_sentences) & set(wl.sentences)
    assert wl.extra_measurements(wl.model) == {}


@pytest.mark.slow
def test_timing_batches_are_fresh_same_shape_and_never_eval_sentences(wl):
    from optistack.core.workload import batch_digest

    batches = [wl.timing_batch(i) for i in range(8)]
    assert len({batch_digest(b) for b in batches}) == 8
    eval_rows = {tuple(r) for inputs, _ in wl._eval_batches for r in inputs["input_ids"].tolist()}
    for args, kwargs in batches:
        assert args == () and kwargs["input_ids"].shape == (8, 128)
        assert set(kwargs) == set(wl._bench)
        assert not eval_rows & {tuple(r) for r in kwargs["input_ids"].tolist()}
    assert wl.run(wl.model, batches[0]).last_hidden_state.shape == (8, 128, 384)
