"""Slow: generate() through the compiled static-cache step (torch.compile), and on the bundled SmolLM2 with
prompt lookup (greedy equals the model's own generate, TextIteratorStreamer text, fewer model calls)."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from gen_fixtures import left_padded, llama, ours, own_generate, prompt
from transformers import TextIteratorStreamer

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import carry_generate

pytestmark = pytest.mark.slow


def test_the_compiled_static_step_serves_generate():
    from torch._dynamo.utils import counters

    base = llama()
    model = Pipeline.parse("kv-cache{impl=static},compile").apply(copy.deepcopy(base), PassContext()).model
    carry_generate(model)  # what the compile pass does for a model whose generate() we installed
    assert model.generate.model is model
    torch._dynamo.reset()
    counters.clear()
    ids = prompt()
    assert torch.equal(ours(model, ids, max_new_tokens=12, do_sample=False),
                       own_generate(base, ids, max_new_tokens=12, do_sample=False))
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps ran through the compiled wrapper
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours(model, ids, **kw), own_generate(base, ids, **kw))


def test_smollm2_prompt_lookup_generate_equals_its_own_and_streams_the_same_text():
    from optistack.passes.decoding.speculative import SpeculativePass
    from optistack.workloads.smollm2 import SmolLM2Workload

    wl = SmolLM2Workload(ppl_chunk=256, ppl_chunks=1)
    base, tok = wl.model, wl.tokenizer
    model = SpeculativePass(check_tokens=8).apply(copy.deepcopy(base), PassContext(workload=wl)).model
    passage = ("The with statement is used to wrap the execution of a block with methods defined by a context "
               "manager. This allows common try, except, finally usage patterns to be encapsulated for reuse.")
    ids = tok(f"Passage: {passage}\nRepeat the passage word for word.\nAnswer: {passage[:40]}", return_tensors="pt")
    calls = []
    handle = model.model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = ours(model, **ids, max_new_tokens=32, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(got, own_generate(base, **ids, max_new_tokens=32, do_sample=False))
    assert len(calls) <= 16, f"{len(calls)} model calls for 32 tokens"

    def streamed(gen, model):
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=gen, args=(model,), kwargs=dict(**ids, max_new_tokens=24, do_sample=False,
                                                                         streamer=streamer))
        worker.start()
        text = "".join(streamer)
        worker.join()
        return text

    text = streamed(lambda m, **kw: m.generate(**kw), model)
    assert text == streamed(own_generate, base) and text.strip()
    assert model.generate.last["session"] == "SpeculativeSession"
