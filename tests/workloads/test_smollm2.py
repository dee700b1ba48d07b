"""SmolLM2 workload on the real bundled model: perplexity is sane and damage raises it, our decode
loop matches greedy `generate`, and calibration text is disjoint from evaluation text."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from optistack.generation import greedy_decode
from optistack.workloads import Workload, load
from optistack.workloads.smollm2 import SmolLM2Workload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wl():
    return load("smollm2")


@pytest.fixture(scope="module")
def small():
    """Fewer, shorter chunks: enough to compare two models cheaply."""
    return SmolLM2Workload(ppl_chunk=256, ppl_chunks=2)


def test_original_perplexity_is_sane(wl):
    assert isinstance(wl, Workload) and wl.metric.name == "perplexity" and not wl.metric.higher_is_better
    scores = wl.evaluate(wl.model)
    assert 5 < scores["perplexity"] < 30
    assert scores["eval_tokens"] >= 4000 and wl.describe()["eval_tokens"] == scores["eval_tokens"]
    assert wl.run(wl.model).logits.shape[:2] == (1, 128)


def test_noise_raises_perplexity_and_bf16_logits_are_upcast(wl, small):
    base = small.evaluate(wl.model)["perplexity"]
    noisy = copy.deepcopy(wl.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))
    assert small.evaluate(noisy)["perplexity"] > base * 1.05
    bf16_logits = small.evaluate(lambda input_ids, **kw: wl.model(input_ids=input_ids).logits.bfloat16())
    assert bf16_logits["perplexity"] == pytest.approx(base, rel=0.01)


def test_generation_metrics_and_decode_matches_generate(wl):
    metrics = wl.extra_measurements(wl.model)
    samples = metrics.pop("samples")  # raw times the report's decode/TTFT CIs come from
    assert set(metrics) == {"ttft_ms", "tpot_ms", "tokens_per_s", "p99_token_ms", "gen_tokens", "kv_bytes_per_token"}
    assert metrics["gen_tokens"] == wl.gen_tokens and all(v > 0 for v in metrics.values())
    assert len(samples["decode_token_ms"]) == wl.gen_tokens - 1 and len(samples["ttft_ms"]) >= 3
    prompt = wl._gen_prompt
    gen = greedy_decode(wl.model, prompt, 8)
    assert gen.tokens.shape == (1, 8) and len(gen.step_ms) == 8
    reference = wl.model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(reference[:, prompt.shape[1]:], gen.tokens)


def test_models_without_a_cache_give_no_generation_metrics(wl):
    with pytest.warns(UserWarning, match="KV cache"):
        assert wl.extra_measurements(lambda input_ids: wl.model(input_ids=input_ids)) == {}
    with pytest.warns(UserWarning, match="ignored"):
        assert wl.extra_measurements(lambda input_ids, **kw: wl.model(input_ids=input_ids, use_cache=False)) == {}


def test_calibration_text_is_disjoint_from_eval_text(wl):
    assert not set(wl.calib_keys) & set(wl.eval_keys)
    inputs = list(wl.calibration_inputs(4))
    assert len(inputs) == 4
    eval_text = wl.tokenizer.decode(wl._chunks.flatten())
    for args, kwargs in inputs:
        assert args == () and kwargs["input_ids"].shape == (1, wl.seq_len)
        assert wl.tokenizer.decode(kwargs["input_ids"][0]) not in eval_text
    assert math.isfinite(wl.describe()["params"]) and wl.describe()["params"] > 1e8


def test_timing_batches_are_fresh_windows_of_calibration_text(wl):
    from optistack.core.workload import batch_digest

    batches = [wl.timing_batch(i) for i in range(6)]
    assert len({batch_digest(b) for b in batches}) == 6
    eval_ids = set(map(tuple, wl._chunks.reshape(-1, wl.seq_len).tolist())) if wl.ppl_chunk % wl.seq_len == 0 else set()
    for _, kwargs in batches:
        assert kwargs["input_ids"].shape == (1, wl.seq_len)
        assert tuple(kwargs["input_ids"][0].tolist()) not in eval_ids
    assert wl.run(wl.model, batches[0]).logits.shape[:2] == (1, wl.seq_len)
