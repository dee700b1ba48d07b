"""generate() on `decode-engine`: the strategy's own session (engine slots) serves greedy, padded batches
and sampling; greedy equals greedy_decode through the same engine token for token."""
from __future__ import annotations

import copy

import pytest
import torch
from gen_fixtures import Recorder, left_padded, ours, prompt, vocab
from tiny_models import tiny_llama

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


@pytest.fixture(scope="module")
def engine():
    base = tiny_llama(vocab_size=vocab(), hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2)
    quant = Pipeline.parse("rtn-int4{group_size=64}").apply(copy.deepcopy(base), PassContext()).model
    result = Pipeline.parse("decode-engine{check_prompts=0,act=int16}").apply(copy.deepcopy(quant), PassContext())
    if not result.modified:
        pytest.skip(f"decode-engine did not apply: {result.info}")
    return result.model


def test_greedy_generate_equals_greedy_decode_through_the_engine(engine):
    ids = prompt()
    got = ours(engine, ids, max_new_tokens=16, do_sample=False)
    assert engine.generate.last["session"] != "ModelSession"  # the strategy's own session, not the fallback
    assert torch.equal(got[:, ids.shape[1] :], greedy_decode(engine, ids, 16).tokens)
    streamer = Recorder()
    ours(engine, ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert len(streamer.puts) == 7 and streamer.ended == 1


def test_padded_rows_decode_as_they_would_alone_and_sampling_runs(engine):
    ids, mask = left_padded()
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = ours(engine, ids, attention_mask=mask, **kw)
    for row in range(3):
        alone = ours(engine, ids[row : row + 1, mask[row].bool()], **kw)
        assert torch.equal(got[row, -10:], alone[0, -10:])
    torch.manual_seed(4)
    first = ours(engine, ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, pad_token_id=0)
    torch.manual_seed(4)
    again = ours(engine, ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, pad_token_id=0)
    assert torch.equal(first, again) and first.shape == (3, 18)


def test_a_loaded_engine_model_generates_through_the_engine(engine, tmp_path):
    import optistack
    from optistack.core.persist import save_model
    from optistack.generation import FastGenerate

    class Step:
        status, info = "applied", {}

        def __init__(self, name, config):
            self.pass_name, self.text, self.config = name, name, config

    original = tiny_llama(vocab_size=vocab(), hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2)
    save_model(tmp_path / "m", engine, original, [Step("rtn-int4", {"group_size": 64}),
                                                  Step("decode-engine", {"check_prompts": 0, "act": "int16"})], {})
    loaded = optistack.load_model(tmp_path / "m")
    assert isinstance(loaded.__dict__["generate"], FastGenerate)
    ids = prompt()
    assert torch.equal(ours(loaded, ids, max_new_tokens=8), ours(engine, ids, max_new_tokens=8))
    assert loaded.generate.last["session"] != "ModelSession"
