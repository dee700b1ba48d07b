"""`decode-engine`: the strategy decodes through the C++ engine, checks itself at apply, and skips with
the reason where it cannot run."""
from __future__ import annotations

import copy

import pytest
import torch

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

needs_engine = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                  reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def apply(model, text: str):
    return Pipeline.parse(text).apply(copy.deepcopy(model), PassContext())


@needs_engine
def test_engine_decodes_and_reports_its_agreement():
    result = apply(tiny_llama(), "rtn-int4{head=int8},decode-engine{min_agreement=0,prefill=model}")
    model = result.model
    assert getattr(model, "optistack_decode", None) is not None
    prompt = torch.randint(0, 300, (2, 9))
    gen = greedy_decode(model, prompt, 12)
    assert gen.tokens.shape == (2, 12) and len(gen.step_ms) == 12
    assert gen.kv_bytes_per_token == 2 * 2 * 1 * 64 * 2  # 2 layers x (keys, values) x 1 kv head x 64 x float16
    plain = greedy_decode(model, prompt, 12, use_strategy=False)
    assert (gen.tokens[:, :1] == plain.tokens[:, :1]).all()  # the first token comes from the model's prefill
    # teacher-forced on the check prompts, the engine (int8 activations) picks the model's own next token
    assert result.info["decode-engine.top1_agreement"] >= 0.9
    assert result.info["decode-engine.agreement_tokens"] == 2 * 31  # two check prompts, 32 tokens each


@needs_engine
def test_an_int8_cache_takes_about_half_the_bytes_and_keeps_the_tokens():
    """kv=int8: the cache holds codes and a scale per position and head; greedy tokens from a short prompt
    follow the float16 cache's (a tiny random model's logits are far apart)."""
    base = apply(tiny_llama(), "rtn-int4{head=int8},decode-engine{check_prompts=0,prefill=engine}").model
    result = apply(tiny_llama(), "rtn-int4{head=int8},decode-engine{kv=int8,prefill=engine}")
    assert result.info["decode-engine.kv_cache"] == "int8"
    assert result.info["decode-engine.top1_agreement"] >= 0.9
    prompt = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    gen, want = greedy_decode(result.model, prompt, 12), greedy_decode(base, prompt, 12)
    assert gen.kv_bytes_per_token == 2 * 2 * 1 * (64 + 4)  # 2 layers x (keys, values) x 1 kv head x (64 codes + scale)
    assert (gen.tokens == want.tokens).float().mean() >= 0.9


@needs_engine
def test_engine_grows_its_cache_for_longer_generations():
    model = apply(tiny_llama(1), "rtn-int4,decode-engine{check_prompts=0}").model
    short = greedy_decode(model, torch.randint(0, 300, (1, 4)), 3)
    long = greedy_decode(model, torch.randint(0, 300, (1, 250)), 20)  # 270 tokens: past the first 256-slot engine
    assert short.tokens.shape == (1, 3) and long.tokens.shape == (1, 20)


@needs_engine
def test_a_copy_of_the_model_decodes_on_its_own():
    model = apply(tiny_llama(1), "rtn-int4,decode-engine{check_prompts=0}").model
    prompt = torch.randint(0, 300, (1, 5))
    want = greedy_decode(model, prompt, 6).tokens
    twin = copy.deepcopy(model)
    assert torch.equal(greedy_decode(twin, prompt, 6).tokens, want)


@needs_engine
def test_refuses_below_min_agreement(monkeypatch):
    from optistack.core.errors import PassApplyError
    from optistack.passes.decoding import engine

    model = apply(tiny_llama(1), "rtn-int4").model
    monkeypatch.setattr(engine.EngineDecode, "agreement", lambda self, model, prompt, ref: (8, 10))
    with pytest.raises(PassApplyError, match="16 times in 20"):
        engine.DecodeEnginePass(min_agreement=0.9).apply(model, PassContext())
    assert getattr(model, "optistack_decode", None) is None  # nothing set on a refused model
    result = engine.DecodeEnginePass(min_agreement=0.8).apply(model, PassContext())
    assert result.info["top1_agreement"] == 0.8


def test_a_float_model_is_skipped_with_the_reason():
    from optistack.passes.decoding.engine import DecodeEnginePass

    result = DecodeEnginePass().apply(tiny_llama(1), PassContext())
    assert not result.modified
    assert "rtn-int4" in result.info["reason"] or "VNNI" in result.info["reason"] or "C++" in result.info["reason"]
    assert getattr(result.model, "optistack_decode", None) is None


def test_options_are_checked():
    from optistack.core.errors import PassConfigError
    from optistack.passes.decoding.engine import DecodeEnginePass

    for bad in ({"min_agreement": 1.5}, {"check_tokens": 1}, {"check_prompts": -1}, {"kv": "int4"}):
        with pytest.raises(PassConfigError, match="decode-engine"):
            DecodeEnginePass(**bad)


@needs_engine
def test_a_saved_model_gets_its_engine_back_on_load(tmp_path):
    from optistack.checkpoints.loadables import load_model
    from optistack.core.persist import save_model

    original = tiny_llama(1)
    quant = apply(original, "rtn-int4").model
    model = apply(quant, "decode-engine{check_prompts=0}").model

    def step(name, text, config):
        class Step:
            status, pass_name, info = "applied", name, {}
        Step.text, Step.config = text, config
        return Step()

    save_model(tmp_path / "m", model, original,
               [step("rtn-int4", "rtn-int4", {}), step("decode-engine", "decode-engine{check_prompts=0}",
                                                       {"check_prompts": 0})], {})
    loaded = load_model(tmp_path / "m")
    assert getattr(loaded, "optistack_decode", None) is not None
    prompt = torch.randint(0, 300, (1, 7))
    assert torch.equal(greedy_decode(loaded, prompt, 8).tokens, greedy_decode(model, prompt, 8).tokens)


@needs_engine
def test_panels_option_reports_its_cost_reaches_every_engine_and_is_refused_in_the_exact_mode():
    from optistack.core.config import PassConfigError
    from optistack.kernels.engine_runtime import default_panels
    from optistack.serving.engine_backend import EngineBackend

    on = apply(tiny_llama(), "rtn-int4{head=int8},decode-engine{check_prompts=0,panels=yes}")
    off = apply(tiny_llama(), "rtn-int4{head=int8},decode-engine{check_prompts=0,panels=no}")
    auto = apply(tiny_llama(), "rtn-int4{head=int8},decode-engine{check_prompts=0}")
    # 2 layers of 128 x 256 q|k|v, 128 x 128 o, 512 x 128 gate|up, 128 x 256 down: codes and float32 s and zc
    codes = 2 * (256 * 128 + 128 * 128 + 512 * 128 + 128 * 256) // 2
    assert on.info["decode-engine.panels"] == f"yes (+{(codes + codes // 32 * 2 * 4) / 2**20:.1f} MB)"
    assert off.info["decode-engine.panels"] == "no"
    assert auto.info["decode-engine.panels"].startswith("yes" if default_panels(8) else "no")
    # a stream takes them for small models only; a server (batches) at any size; never with int16 activations
    from optistack.kernels.engine_runtime import PANELS_ALONE_MAX_BYTES

    assert default_panels(8, PANELS_ALONE_MAX_BYTES) is True and default_panels(8, PANELS_ALONE_MAX_BYTES + 1) is False
    assert default_panels(8, 10 * PANELS_ALONE_MAX_BYTES, batches=True) is True  # batches: on every CPU
    assert default_panels(16) is False and default_panels(16, batches=True) is False
    with EngineBackend.from_model(auto.model, max_batch=2, max_context=64) as be:
        assert be.runtime.impl.panels is True
    from types import SimpleNamespace

    big, stream = SimpleNamespace(code_bytes=2 * PANELS_ALONE_MAX_BYTES), SimpleNamespace(act_bits=8, panels=None)
    assert EngineBackend._panels(None, stream, big, 8) is True  # a server's batches: at any size, any CPU
    assert EngineBackend._panels(None, stream, big, 1) is False  # one stream of a big model: as a stream
    assert EngineBackend._panels(False, stream, big, 8) is False
    prompt = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = greedy_decode(on.model, prompt, 10).tokens, greedy_decode(off.model, prompt, 10).tokens
    assert (a == b).float().mean() >= 0.9  # the same codes; only the float sums' order differs
    assert on.model.optistack_decode.acquire(1, 16)[0].impl.panels is True
    assert off.model.optistack_decode.acquire(1, 16)[0].impl.panels is False
    with EngineBackend.from_model(on.model, max_batch=2, max_context=64) as be:
        assert be.runtime.impl.panels is True
    with EngineBackend.from_model(on.model, max_batch=2, max_context=64, panels=False) as be:
        assert be.runtime.impl.panels is False
    with pytest.raises(PassConfigError, match="panels=yes' needs act=int8"):
        Pipeline.parse("rtn-int4,decode-engine{act=int16,panels=yes}")
