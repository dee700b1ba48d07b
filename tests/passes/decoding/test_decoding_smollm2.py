"""The decoding passes on the bundled SmolLM2-135M (slow): prompt lookup is token-identical and accepts
copied spans, the quantized KV cache keeps logits close, a compiled static-cache decode is exact."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama
from transformers import DynamicCache

from optistack.core.pass_protocol import PassContext
from optistack.generation import greedy_decode
from optistack.passes.compile.inductor import CompilePass
from optistack.passes.decoding.kv_cache import KvCachePass
from optistack.passes.decoding.quantized_cache import QuantizedKVCache
from optistack.passes.decoding.speculative import SpeculativePass

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wl():
    from optistack.workloads.smollm2 import SmolLM2Workload

    return SmolLM2Workload(ppl_chunk=256, ppl_chunks=1)


def copy_prompt(wl) -> torch.Tensor:
    passage = ("The with statement is used to wrap the execution of a block with methods defined by a context "
               "manager. This allows common try, except, finally usage patterns to be encapsulated for reuse.")
    text = f"Passage: {passage}\nRepeat the passage word for word.\nAnswer: {passage[:40]}"
    return wl.tokenizer(text, return_tensors="pt")["input_ids"]


def test_prompt_lookup_is_token_identical_and_accepts_copied_spans(wl):
    result = SpeculativePass(check_tokens=16).apply(copy.deepcopy(wl.model), PassContext(workload=wl))
    prompt = copy_prompt(wl)
    plain, spec = greedy_decode(wl.model, prompt, 32), greedy_decode(result.model, prompt, 32)
    assert torch.equal(plain.tokens, spec.tokens)
    assert spec.metrics()["tokens_per_step"] >= 2.0  # far fewer target forwards than tokens


@pytest.mark.parametrize("bits, group, floor", [(8, 64, 35.0), (4, 32, 17.0)])  # measured 43 and 20 dB
def test_quantized_kv_cache_logits_close_to_float(wl, bits, group, floor):
    ids = copy_prompt(wl)[:, :48]
    with torch.no_grad():
        outs = {}
        for name, cache in (("ref", DynamicCache(config=wl.model.config)), ("q", QuantizedKVCache(30, bits, group))):
            logits = [wl.model(input_ids=ids[:, :16], cache=cache, use_cache=True).logits[:, -1:]]
            for i in range(16, ids.shape[1]):
                logits.append(wl.model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits)
            outs[name] = torch.cat(logits, dim=1)
    ref, got = outs["ref"], outs["q"]
    assert float(20 * torch.log10(ref.norm() / (ref - got).norm())) >= floor
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= (0.95 if bits == 8 else 0.85)


def test_compiled_static_cache_decode_is_exact():
    model = tiny_llama(vocab_size=128)
    static = KvCachePass().apply(copy.deepcopy(model), PassContext()).model
    compiled = CompilePass().apply(static, PassContext()).model
    ids = torch.randint(0, 128, (1, 12))
    want = greedy_decode(model, ids, 8).tokens
    for _ in range(2):  # the second run reuses the cache and the compiled decode step
        assert torch.equal(greedy_decode(compiled, ids, 8).tokens, want)
