"""Models with a sliding window (Mistral 7B v0.1's 4096, Qwen2 with `use_sliding_window`) on the engine: within
the window every earlier position is attended, so the engine serves sequences up to that length, with the
quantized model's own tokens in the exact mode; a longer one runs the model's own loop with a warning that
names the window."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from gen_fixtures import left_padded, optistack_warnings, ours, own_generate, prompt, vocab
from transformers import AutoConfig, AutoModelForCausalLM

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")
WINDOW = 40


def windowed(kind: str):
    torch.manual_seed(0)
    extra = {"use_sliding_window": True, "max_window_layers": 0} if kind == "qwen2" else {}
    config = AutoConfig.for_model(kind, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab(), bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, max_position_embeddings=256,
                                  sliding_window=WINDOW, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def pair(request):
    from optistack.kernels.llama_engine import attention_window

    model = windowed(request.param)
    assert attention_window(model) == WINDOW
    quant = Pipeline.parse("rtn-int4{head=int8},fuse-kernels").apply(model, PassContext()).model
    result = Pipeline.parse("decode-engine{act=int16,prefill=model,check_prompts=0}").apply(
        copy.deepcopy(quant), PassContext())
    assert result.modified, result.info
    assert result.model.optistack_decode.weights.max_positions == WINDOW
    return quant, result.model


def test_within_the_window_the_engine_gives_the_quantized_models_own_tokens(pair):
    quant, engine = pair
    ids = prompt(1, 9, 1)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=WINDOW - 9, do_sample=False, eos_token_id=[],
              pad_token_id=0)
    assert torch.equal(ours(engine, ids, **kw), own_generate(quant, ids, **kw))
    ids, mask = left_padded()  # 8 positions, padding included
    kw = dict(attention_mask=mask, max_new_tokens=WINDOW - 8, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(ours(engine, ids, **kw), own_generate(quant, ids, **kw))


def test_past_the_window_the_models_own_loop_runs_and_says_why(pair):
    """Past the window the model's own attention drops the oldest positions, which the engine would keep."""
    quant, engine = pair
    ids = prompt(1, 9, 2)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=WINDOW, do_sample=False, eos_token_id=[],
              pad_token_id=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = engine.generate(ids, **kw)
    said = optistack_warnings(seen)
    assert len(said) == 1 and f"the model's sliding window ({WINDOW})" in said[0], said
    assert torch.equal(got, own_generate(quant, ids, **kw))
