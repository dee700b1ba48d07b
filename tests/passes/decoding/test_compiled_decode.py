"""One compiled decode step: int4 body + int8 head + fused kernels + static cache under torch.compile
(C++ wrapper, frozen weights) is one graph with no breaks, and decodes the same tokens as eager."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.kernels import cpu

EAGER = "rtn-int4{group_size=32,head=int8},fuse-kernels,kv-cache{impl=static}"
COMPILED = EAGER + ",compile{freezing=true,cpp_wrapper=true}"


def build(text: str, model):
    return Pipeline.parse(text).apply(copy.deepcopy(model), PassContext()).model


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph_and_token_identical_for_batches_1_and_3():
    if not cpu.available():
        pytest.skip(cpu.available().reason)
    from torch._dynamo.utils import counters

    model = tiny_llama(vocab_size=128, tie_word_embeddings=True)
    eager, compiled = build(EAGER, model), build(COMPILED, model)
    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 3):
        prompt = torch.randint(0, 128, (batch, 9), generator=torch.Generator().manual_seed(batch))
        want = greedy_decode(eager, prompt, 24).tokens
        got = greedy_decode(compiled, prompt, 24).tokens
        assert torch.equal(got, want)
        if batch == 1:
            assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
            assert counters["stats"]["unique_graphs"] == 1  # 23 decode steps, one graph, no recompiles
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
