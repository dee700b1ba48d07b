"""SimpleBackend keeps the Backend contract with the model's own generate(): greedy tokens equal
generate's, stop tokens end with "stop", cancel frees the worker, close fails what is queued."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_serving  # noqa: E402

from optistack.serving.backend import Backend, SamplingParams, ServingError  # noqa: E402
from optistack.serving.simple_backend import SimpleBackend  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_serving.tokenizer()
    return tok, tiny_serving.model(tok, context=2048)


@pytest.fixture
def backend(tiny):
    b = SimpleBackend(tiny[1], max_context=2048)
    yield b
    b.close()


def _wait_idle(b: SimpleBackend) -> None:
    for _ in range(200):
        if b.active == 0 and b.queued == 0:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"backend still busy: {b.stats()}")


def test_greedy_tokens_equal_the_models_own_generate_and_stream_through_callbacks(tiny, backend):
    tok, model = tiny
    ids = tok("def main():")["input_ids"]
    seen, done = [], []
    h = backend.submit(ids, SamplingParams(max_new_tokens=12), on_token=lambda h, t: seen.append(t),
                       on_done=lambda h: done.append(h.finish_reason))
    assert isinstance(backend, Backend)
    assert list(h.stream(timeout=30)) == tiny_serving.greedy(model, ids, 12)
    assert h.wait(5) and seen == h.tokens and done == [h.finish_reason] == ["length"]
    assert len(h.token_times) == 12 and h.ttft_s is not None


def test_a_stop_token_ends_the_request_with_stop(tiny, backend):
    tok, model = tiny
    ids = tok("x = 1")["input_ids"]
    free = tiny_serving.greedy(model, ids, 8)
    stop = free[3]
    h = backend.submit(ids, SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
    assert h.wait(30)
    assert h.finish_reason == "stop" and h.tokens == free[:free.index(stop) + 1]


def test_seeded_sampling_is_reproducible(tiny, backend):
    tok, _ = tiny
    ids = tok("import os")["input_ids"]
    p = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, seed=7)
    a, b = backend.submit(ids, p), backend.submit(ids, p)
    assert a.wait(30) and b.wait(30) and a.tokens == b.tokens


def test_cancel_running_and_queued_requests(tiny, backend):
    tok, _ = tiny
    ids = tok("while True:")["input_ids"]
    first = threading.Event()
    running = backend.submit(ids, SamplingParams(max_new_tokens=1900), on_token=lambda h, t: first.set())
    queued = backend.submit(ids, SamplingParams(max_new_tokens=5))
    assert first.wait(30)
    queued.cancel()
    running.cancel()
    assert running.wait(30) and queued.wait(30)
    assert running.finish_reason == "cancelled" and len(running.tokens) < 1900
    assert queued.finish_reason == "cancelled" and queued.tokens == []
    _wait_idle(backend)
    assert backend.submit(ids, SamplingParams(max_new_tokens=2)).wait(30)  # still serving


def test_refusals_are_one_serving_error(tiny, backend):
    tok, _ = tiny
    with pytest.raises(ServingError, match="exceeds this backend's context of 2048"):
        backend.submit([5] * 2000, SamplingParams(max_new_tokens=100))
    with pytest.raises(ServingError, match="outside the vocabulary"):
        backend.submit([5, 10**6], SamplingParams())
    with pytest.raises(ServingError, match="max_position_embeddings"):
        SimpleBackend(tiny[1], max_context=4096)
    with pytest.raises(ServingError, match="generate"):
        SimpleBackend(object())


def test_close_fails_what_is_queued_and_refuses_new_requests(tiny):
    tok, model = tiny
    b = SimpleBackend(model, max_context=2048)
    ids = tok("for i in range(3):")["input_ids"]
    started = threading.Event()
    running = b.submit(ids, SamplingParams(max_new_tokens=1900), on_token=lambda h, t: started.set())
    waiting = b.submit(ids, SamplingParams(max_new_tokens=4))
    assert started.wait(30)
    b.close()
    assert running.finish_reason == waiting.finish_reason == "error" and len(running.tokens) < 1900
    assert "closed while this request ran" in running.error and "closed before" in waiting.error
    with pytest.raises(ServingError, match="closed"):
        b.submit(ids, SamplingParams())
