"""StockBackend: transformers' own continuous batching behind the Backend contract, on a tiny random Llama."""
from __future__ import annotations

import time

import pytest
import torch

from optistack.serving.backend import Backend, SamplingParams, ServingError
from optistack.serving.stock import StockBackend

PROMPTS = [[1, 5, 7, 9, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21], list(range(30, 70))]


@pytest.fixture()
def backend(model):
    b = StockBackend(model, max_batch=4, max_context=96)
    yield b
    b.close()


def _greedy(model, prompt, n, eos=None):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_streams_the_models_own_greedy_tokens_with_requests_batched_together(model, backend):
    assert isinstance(backend, Backend)
    streamed = {}
    handles = [backend.submit(p, SamplingParams(max_new_tokens=12),
                              on_token=lambda h, t: streamed.setdefault(h.request_id, []).append(t)) for p in PROMPTS]
    for prompt, h in zip(PROMPTS, handles):
        tokens = list(h.stream(timeout=60))
        assert tokens == _greedy(model, prompt, 12), f"prompt of {len(prompt)} tokens"
        assert streamed[h.request_id] == tokens == h.tokens  # on_token saw each token, in order
        assert h.finish_reason == "length" and len(h.token_times) == 12
        assert 0 < h.ttft_s < h.token_times[-1] - h.submitted_at  # the first token came before the last
        assert h.token_times == sorted(h.token_times)


def test_a_stop_token_ends_the_request_and_is_kept(model, backend):
    free = _greedy(model, PROMPTS[0], 12)
    stop = free[4]  # the 5th token the model would produce
    h = backend.submit(PROMPTS[0], SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)))
    assert list(h.stream(timeout=60)) == free[: free.index(stop) + 1]
    assert h.finish_reason == "stop"
    assert _greedy(model, PROMPTS[0], 12, eos=stop) == h.tokens  # what generate() does with that EOS


def test_sampling_reaches_transformers_per_request_warpers(model, backend):
    greedy = _greedy(model, PROMPTS[1], 10)
    top1 = backend.submit(PROMPTS[1], SamplingParams(max_new_tokens=10, do_sample=True, top_k=1))
    hot = backend.submit(PROMPTS[1], SamplingParams(max_new_tokens=10, do_sample=True, temperature=50.0))
    assert list(top1.stream(timeout=60)) == greedy  # top_k=1 leaves only the argmax to sample
    tokens = list(hot.stream(timeout=60))
    assert len(tokens) == 10 and all(0 <= t < 100 for t in tokens) and tokens != greedy  # near-uniform sampling


@pytest.mark.parametrize("prompt, params, words", [
    (list(range(90)), SamplingParams(max_new_tokens=10), "exceeds this backend's context of 96"),
    ([1, 2, 100], SamplingParams(), "outside the vocabulary 0..99"),
    ([], SamplingParams(), "the prompt is empty"),
    ([1, 2], SamplingParams(min_new_tokens=2), "min_new_tokens=2"),
    ([1, 2], SamplingParams(repetition_penalty=1.2), "repetition_penalty=1.2"),
    ([1, 2], SamplingParams(do_sample=True, seed=3), "seed=3"),
])
def test_submit_refuses_with_one_error_naming_what(backend, prompt, params, words):
    with pytest.raises(ServingError, match=words):
        backend.submit(prompt, params)
    assert backend.stats()["in_flight"] == 0


def test_bad_options_and_a_reused_request_id_are_refused(model, backend):
    with pytest.raises(ServingError, match="max_context 4096 exceeds the model's 2048 positions"):
        StockBackend(model, max_context=4096)
    with pytest.raises(ServingError, match="max_batch must be an integer >= 1"):
        StockBackend(model, max_batch=0)
    with pytest.raises(ServingError, match="needs a transformers PreTrainedModel"):
        StockBackend(torch.nn.Linear(2, 2))
    h = backend.submit([1, 2, 3], SamplingParams(max_new_tokens=80), request_id="same")
    with pytest.raises(ServingError, match="'same' is already in flight"):
        backend.submit([1, 2, 3], SamplingParams(max_new_tokens=4), request_id="same")
    h.cancel()
    assert h.wait(10)


def test_cancel_frees_the_request_in_transformers_scheduler_and_cache(model, backend):
    first = []
    h = backend.submit(list(range(10, 20)), SamplingParams(max_new_tokens=80), on_token=lambda h, t: first.append(t))
    deadline = time.time() + 30
    while not first and time.time() < deadline:
        time.sleep(0.002)
    assert backend.stats()["cache_holders"] == 1  # it holds KV cache blocks while it runs
    h.cancel()
    assert h.wait(10) and h.finish_reason == "cancelled" and len(h.tokens) < 80
    deadline = time.time() + 10  # the manager drops it before its next step
    while time.time() < deadline and any(backend.stats()[k] for k in ("manager_active", "manager_waiting", "cache_holders")):
        time.sleep(0.01)
    assert backend.stats() == {"in_flight": 0, "manager_active": 0, "manager_waiting": 0, "cache_holders": 0}
    after = backend.submit(PROMPTS[0], SamplingParams(max_new_tokens=6))  # and the backend goes on serving
    assert list(after.stream(timeout=60)) == _greedy(model, PROMPTS[0], 6)


def test_close_fails_what_is_in_flight_and_restores_the_attention(model):
    before = model.config._attn_implementation
    b = StockBackend(model, max_batch=2, max_context=512)
    h = b.submit([1, 2, 3], SamplingParams(max_new_tokens=500))
    b.close()
    assert h.wait(10) and h.finish_reason in ("error", "length")  # closed mid-way (or, on a fast box, done)
    if h.finish_reason == "error":
        assert "closed" in h.error
    with pytest.raises(ServingError, match="is closed"):
        b.submit([1, 2], SamplingParams())
    assert model.config._attn_implementation == before
