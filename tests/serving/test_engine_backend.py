"""Continuous batching on the C++ engine: every request gets what it gets alone, whatever joins or leaves."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags
from optistack.serving.backend import SamplingParams, ServingError

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")

VOCAB = 300


@pytest.fixture(scope="module")
def float_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                                  num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


def engine(model, options: str = ""):
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    chain = f"rtn-int4{{head=int8}},decode-engine{{check_prompts=0{options}}}"
    return Pipeline.parse(chain).apply(copy.deepcopy(model), PassContext()).model


@pytest.fixture(scope="module")
def engine_model(float_model):
    return engine(float_model)


def alone(model, ids: list[int], n: int, kv: str = "int8") -> list[int]:
    """Greedy on the engine, one request, one row per call after an engine prefill of the whole prompt, on a
    cache of type `kv` (a server's default with int8 activations)."""
    weights = model.optistack_decode.weights
    rt = weights.runtime(1, 64, kv=kv)
    logits = rt.prefill([ids], [0])
    out = [int(logits[0].argmax())]
    while len(out) < n:
        logits = rt.forward(torch.tensor([out[-1]]), torch.tensor([0]), torch.tensor([len(ids) + len(out) - 1]),
                            torch.tensor([0]))
        out.append(int(logits[0].argmax()))
    return out


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def test_requests_joining_and_leaving_each_decode_as_alone(engine_model):
    """Nine requests of different lengths through three slots and a 16-row budget: prompts are chunked,
    requests wait, join while others decode, leave at different lengths."""
    from optistack.serving.engine_backend import EngineBackend

    asks = prompts(9)
    lengths = [4 + 3 * i for i in range(9)]
    with EngineBackend.from_model(engine_model, max_batch=3, max_context=64, step_tokens=16) as backend:
        handles = [backend.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(asks, lengths)]
        assert all(h.wait(60) for h in handles)
        stats = backend.stats()
    assert [h.finish_reason for h in handles] == ["length"] * 9
    for h, p, n in zip(handles, asks, lengths):
        assert h.tokens == alone(engine_model, p, n)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["rows"] > stats["steps"]  # rows of several requests shared calls
    assert stats["kv_cache"] == "int8"  # a server's default with int8 activations


def test_a_servers_kv_cache_is_int8_unless_told(engine_model):
    """Nobody chose (decode-engine's kv=auto): int8, half float16's bytes a token; asked for: what was asked,
    and its requests decode as a request alone on that cache; a wrong name is one clear error."""
    from optistack.serving import backends_for
    from optistack.serving.engine_backend import EngineBackend

    with EngineBackend.from_model(engine_model, max_batch=2, max_context=64) as be:
        assert be.runtime.kv == "int8"
        int8_bytes = be.runtime.kv_bytes_per_token
    ask = prompts(1, seed=7)[0]
    with backends_for(engine_model, max_batch=2, max_context=64, kv="float16") as be:
        assert be.runtime.kv == "float16" and be.stats()["kv_cache"] == "float16"
        assert be.name == "optistack-engine (float16 KV cache)"  # what the scenario's report names
        assert int8_bytes < 0.6 * be.runtime.kv_bytes_per_token
        h = be.submit(ask, SamplingParams(max_new_tokens=8))
        assert h.wait(60)
    assert h.tokens == alone(engine_model, ask, 8, kv="float16")
    with pytest.raises(ServingError, match="kv must be one of"):
        EngineBackend.from_model(engine_model, max_batch=2, max_context=64, kv="int4")
    with pytest.raises(ServingError, match="has no engine"):
        backends_for(torch.nn.Linear(2, 2), kv="int8")


def test_the_kv_the_decode_engine_step_was_told_is_kept_by_a_server(float_model, engine_model):
    """decode-engine{kv=float16} is a choice, kept through a copy of the model; kv=auto's float16 for one stream
    is not (the server picks int8)."""
    from optistack.serving.engine_backend import EngineBackend

    told = engine(float_model, ",kv=float16")
    for model in (told, copy.deepcopy(told)):
        with EngineBackend.from_model(model, max_batch=2, max_context=64) as be:
            assert be.runtime.kv == "float16"
    assert engine_model.optistack_decode.kv == "float16"  # one stream's default
    with EngineBackend.from_model(copy.deepcopy(engine_model), max_batch=2, max_context=64) as be:
        assert be.runtime.kv == "int8"


def test_stop_tokens_min_length_and_streams(engine_model):
    from optistack.serving.engine_backend import EngineBackend

    ask = prompts(1, seed=3)[0]
    want = alone(engine_model, ask, 12)
    stop = want[4]
    first = want.index(stop)
    with EngineBackend.from_model(engine_model, max_batch=2, max_context=64) as backend:
        h = backend.submit(ask, SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)))
        assert list(h.stream(timeout=60)) == want[: first + 1] and h.finish_reason == "stop"
        late = backend.submit(ask, SamplingParams(max_new_tokens=12, min_new_tokens=first + 2, stop_token_ids=(stop,)))
        late.wait(60)
    assert stop not in late.tokens[: first + 2] and late.tokens[: first] == want[: first]


def test_sampling_is_seeded_per_request_whatever_shares_the_batch(engine_model):
    from optistack.serving.engine_backend import EngineBackend

    ask = prompts(1, seed=5)[0]
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    with EngineBackend.from_model(engine_model, max_batch=4, max_context=64) as backend:
        solo = backend.submit(ask, params)
        solo.wait(60)
        crowd = [backend.submit(p, SamplingParams(max_new_tokens=10, do_sample=True, seed=i)) for i, p in enumerate(prompts(3))]
        again = backend.submit(ask, params)
        assert again.wait(60) and all(h.wait(60) for h in crowd)
        other = backend.submit(ask, dataclass_replace(params, seed=8))
        other.wait(60)
    assert again.tokens == solo.tokens and other.tokens != solo.tokens


def dataclass_replace(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_cancel_frees_the_slot_and_bad_requests_are_refused(engine_model):
    from optistack.serving.engine_backend import EngineBackend

    with EngineBackend.from_model(engine_model, max_batch=1, max_context=128) as backend:
        started = threading.Event()
        h = backend.submit(prompts(1)[0], SamplingParams(max_new_tokens=50), on_token=lambda h, t: started.set())
        assert started.wait(60)
        h.cancel()
        assert h.wait(60) and h.finish_reason == "cancelled" and len(h.tokens) < 50
        nxt = backend.submit(prompts(1, seed=1)[0], SamplingParams(max_new_tokens=3))  # the one slot is free again
        assert nxt.wait(60) and nxt.finish_reason == "length"
        with pytest.raises(ServingError, match="exceeds this backend's context of 128"):
            backend.submit([1] * 124, SamplingParams(max_new_tokens=5))
        with pytest.raises(ServingError, match="outside the vocabulary"):
            backend.submit([1, VOCAB], SamplingParams(max_new_tokens=5))
        with pytest.raises(ServingError, match="empty"):
            backend.submit([], SamplingParams(max_new_tokens=5))
    with pytest.raises(ServingError, match="no decode engine"):
        EngineBackend.from_model(torch.nn.Linear(2, 2))
