"""The exact mode (`decode-engine{act=int16}`): generate() on the engine gives the very tokens of the same
quantized model's own generate() (transformers' loop, the model's own int4 kernels), at batch 1 and for a
left-padded batch of 3, on Llama and Qwen2 (with its q/k/v biases)."""
from __future__ import annotations

import copy

import pytest
import torch
from gen_fixtures import left_padded, ours, own_generate, prompt, vocab
from transformers import AutoConfig, AutoModelForCausalLM

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab(),
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "smollm3"])
def pair(request):
    quant = Pipeline.parse("rtn-int4{head=int8},fuse-kernels").apply(tiny(request.param), PassContext()).model
    chain = "decode-engine{act=int16,prefill=model,check_prompts=0}"
    engine = Pipeline.parse(chain).apply(copy.deepcopy(quant), PassContext()).model
    assert engine.optistack_decode is not None
    return quant, engine


def test_batch_one_gives_the_quantized_models_own_tokens(pair):
    quant, engine = pair
    for seed in (1, 2, 3):
        ids = prompt(1, 9, seed)
        kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=[], pad_token_id=0)
        want = own_generate(quant, ids, attention_mask=torch.ones_like(ids), **kw)
        got = ours(engine, ids, attention_mask=torch.ones_like(ids), **kw)
        assert engine.generate.last["session"] == "EngineSession"
        assert torch.equal(got, want), (seed, got[0, 9:].tolist(), want[0, 9:].tolist())


def test_a_left_padded_batch_gives_the_quantized_models_own_tokens(pair):
    quant, engine = pair
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(ours(engine, ids, **kw), own_generate(quant, ids, **kw))


@pytest.mark.slow
def test_smollm2_exact_mode_gives_its_own_tokens_alone_and_left_padded():
    from optistack.workloads.smollm2 import SmolLM2Workload

    wl = SmolLM2Workload(ppl_chunk=256, ppl_chunks=1)
    tok = wl.tokenizer
    quant = Pipeline.parse("rtn-int4{head=int8,zero_grid=float},fuse-kernels").apply(
        copy.deepcopy(wl.model), PassContext(workload=wl)).model
    engine = Pipeline.parse("decode-engine{act=int16,prefill=model,check_prompts=0}").apply(
        copy.deepcopy(quant), PassContext(workload=wl)).model
    texts = ["The with statement is used to", "Paris is the capital of",
             "In Python, a list comprehension builds a new list by"]
    kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    for text in texts:
        enc = tok(text, return_tensors="pt")
        assert torch.equal(ours(engine, **enc, **kw), own_generate(quant, **enc, **kw)), text
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the rows really are padded
    assert torch.equal(ours(engine, **batch, **kw), own_generate(quant, **batch, **kw))


def test_the_exact_mode_names_a_bfloat16_reference():
    """torch's int4pack kernel (rtn-int4 without fuse-kernels) rounds activations to bfloat16: the report says
    the model's own tokens are then its bfloat16 rounding's; after fuse-kernels (float32 projections) it says nothing."""
    info = Pipeline.parse("rtn-int4,decode-engine{act=int16,check_prompts=0}").apply(tiny("llama"), PassContext()).info
    assert "bfloat16" in info["decode-engine.exact_reference"] and info["decode-engine.head"] == "float32 (the model's own)"
    fused = Pipeline.parse("rtn-int4,fuse-kernels,decode-engine{act=int16,check_prompts=0}").apply(tiny("llama"),
                                                                                                 PassContext()).info
    assert "decode-engine.exact_reference" not in fused
