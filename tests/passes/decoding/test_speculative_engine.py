"""`speculative` after `decode-engine`: drafts verified as rows of one engine call, tokens identical to the
engine's own greedy decoding (int8 activations and the exact mode), several tokens a pass over the weights."""
from __future__ import annotations

import copy

import pytest
import torch

from optistack.core.errors import PassApplyError
from optistack.core.hooks import DECODE_ATTR
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def engines():
    """act -> (the model on decode-engine alone, the same with speculative prompt lookup on top)."""
    out = {}
    quant = Pipeline.parse("rtn-int4{head=int8}").apply(tiny_llama(), PassContext()).model
    for act in ("int8", "int16"):
        engine = Pipeline.parse(f"decode-engine{{act={act},check_prompts=0}}").apply(copy.deepcopy(quant),
                                                                                   PassContext()).model
        result = Pipeline.parse("speculative{num_draft_tokens=8,min_ngram=1}").apply(copy.deepcopy(engine),
                                                                                  PassContext())
        out[act] = engine, result
    return out


def repetitive(seed: int) -> torch.Tensor:
    """A prompt that repeats a phrase: a tiny random model tends to continue such loops, so drafts land."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 300, (6,), generator=g)
    return torch.cat([torch.randint(0, 300, (3,), generator=g), phrase, phrase, phrase]).view(1, -1)


@pytest.mark.parametrize("act", ["int8", "int16"])
def test_tokens_equal_the_engines_own_greedy_decoding(engines, act):
    engine, result = engines[act]
    assert result.info["speculative.verifies_on"] == "decode-engine"
    spec = result.model
    assert getattr(spec, DECODE_ATTR).base is not None
    multi = 0
    for seed in range(4):
        prompt = repetitive(seed)
        want = greedy_decode(engine, prompt, 40)
        got = greedy_decode(spec, prompt, 40)
        assert torch.equal(got.tokens, want.tokens), seed
        assert sum(got.tokens_per_step) == 40
        multi += sum(n > 1 for n in got.tokens_per_step)
        assert got.kv_bytes_per_token == want.kv_bytes_per_token
    assert multi > 0  # some steps accepted drafts: several tokens from one engine call


def test_generate_speculates_on_the_engine(engines):
    engine, result = engines["int8"]
    prompt = repetitive(7)
    want = engine.generate(prompt, max_new_tokens=24, do_sample=False)
    got = result.model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)


def test_a_strategy_other_than_the_engine_is_still_refused(engines):
    from optistack.passes.decoding.speculative import SpeculativePass

    _, result = engines["int8"]
    with pytest.raises(PassApplyError, match="already has a decode strategy.*SpeculativeDecoder"):
        SpeculativePass(check_prompts=1, check_tokens=4).apply(copy.deepcopy(result.model), PassContext())


def test_a_refused_check_keeps_the_engine(engines, monkeypatch):
    from optistack.passes.decoding import speculative

    engine, _ = engines["int8"]
    target = copy.deepcopy(engine)
    base = getattr(target, DECODE_ATTR)
    monkeypatch.setattr(speculative, "_matching_prefix", lambda drafts, best: len(drafts))  # accepts anything
    with pytest.raises(PassApplyError, match="differs"):
        speculative.SpeculativePass(min_ngram=1, check_tokens=24).apply(target, PassContext())
    assert getattr(target, DECODE_ATTR) is base
