"""`kv-cache`: a static cache decodes exactly like the dynamic one, caches roll back (crop), and the
int8/int4 quantized cache stays close to float decoding (tiny random Llama)."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama, tiny_llama_workload
from transformers import DynamicCache, StaticCache

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.hooks import CACHE_ATTR
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode
from optistack.passes.decoding.kv_cache import KvCachePass, bytes_per_token
from optistack.passes.decoding.quantized_cache import QuantizedKVCache, dequantize_groups, quantize_groups
from optistack.testing import sqnr

CTX = PassContext()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=128, head_dim=32, num_attention_heads=2, num_key_value_heads=1)


@torch.no_grad()
@torch.no_grad()
def teacher_forced_logits(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position after `prefill`, fed one token at a time through `cache`."""
    outs = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits[:, -1:]]
    for i in range(prefill, ids.shape[1]):
        outs.append(model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    return torch.cat(outs, dim=1)


def test_static_cache_decodes_like_the_dynamic_one(model):
    result = KvCachePass().apply(copy.deepcopy(model), CTX)
    full = 2 * 2 * 1 * 32 * 4.0  # layers x K,V x kv_heads x head_dim x fp32
    assert result.info == {"impl": "static", "kv_bytes_per_token": full, "kv_bytes_per_token_full": full}
    ids = torch.randint(0, 128, (1, 11))
    plain, static = greedy_decode(model, ids, 16), greedy_decode(result.model, ids, 16)
    assert torch.equal(plain.tokens, static.tokens) and static.kv_bytes_per_token == full
    again = greedy_decode(result.model, ids, 16)  # the cache is reset and reused, not stale
    assert torch.equal(again.tokens, plain.tokens)
    factory = getattr(result.model, CACHE_ATTR)
    assert len(factory._caches) == 1 and next(iter(factory._caches)) == 256  # rounded up to the bucket
    assert getattr(copy.deepcopy(result.model), CACHE_ATTR)._caches == {}


def test_fixed_max_cache_len_too_small_is_refused(model):
    short = KvCachePass(max_cache_len=8).apply(copy.deepcopy(model), CTX).model
    with pytest.raises(PassApplyError, match="needs 14 cache slots but max_cache_len=8"):
        greedy_decode(short, torch.randint(0, 128, (1, 10)), 4)


@pytest.mark.parametrize("make", [lambda m: DynamicCache(config=m.config),
                                  lambda m: StaticCache(config=m.config, max_cache_len=32),
                                  lambda m: QuantizedKVCache(2, bits=8, group_size=32)])
def test_crop_rolls_back_rejected_tokens(model, make):
    ids = torch.randint(0, 128, (1, 14))
    with torch.no_grad():
        straight = make(model)
        model(input_ids=ids[:, :10], cache=straight, use_cache=True)
        want = model(input_ids=ids[:, 10:], cache=straight, use_cache=True).logits
        rolled = make(model)
        model(input_ids=ids[:, :10], cache=rolled, use_cache=True)
        model(input_ids=torch.randint(0, 128, (1, 3)), cache=rolled, use_cache=True)  # rejected drafts
        rolled.crop(-3)
        assert int(rolled.get_seq_length()) == 10
        got = model(input_ids=ids[:, 10:], cache=rolled, use_cache=True).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bits, group, floor", [(8, 32, 35.0), (8, 8, 40.0), (4, 32, 12.0), (4, 8, 18.0)])
def test_quantize_groups_round_trip(bits, group, floor):
    x = torch.randn(2, 3, 5, 64) * torch.linspace(0.1, 4, 64)  # skewed channels, like keys
    codes, scale, lo = quantize_groups(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 64 * bits // 8 and scale.shape == (2, 3, 5, 64 // group)
    assert sqnr(x, dequantize_groups(codes, scale, lo, bits, group, torch.float32)) >= floor


@pytest.mark.parametrize("bits, floor", [(8, 30.0), (4, 12.0)])
def test_quantized_cache_logits_stay_close_to_float(model, bits, floor):
    ids = torch.randint(0, 128, (1, 40))
    ref = teacher_forced_logits(model, DynamicCache(config=model.config), ids, 8)
    got = teacher_forced_logits(model, QuantizedKVCache(2, bits=bits, group_size=32), ids, 8)
    assert sqnr(ref, got) >= floor


def test_quantized_pass_reports_bytes_per_token(model):
    result = KvCachePass(impl="quantized", bits=4).apply(copy.deepcopy(model), CTX)  # head_dim 32: one group
    per_token = 2 * 2 * 1 * (32 / 2 + 2 * 2)  # layers x K,V x kv_heads x (int4 codes + fp16 scale, min)
    assert result.info["kv_bytes_per_token"] == per_token
    gen = greedy_decode(result.model, torch.randint(0, 128, (1, 9)), 6)
    assert gen.kv_bytes_per_token == per_token and gen.metrics(include_memory=True)["kv_bytes_per_token"] == per_token
    int8 = bytes_per_token(model.config, "quantized", 4, bits=8)
    assert int8 == 2 * 2 * 1 * (32 + 4) and bytes_per_token(model.config, "dynamic", 4) == 512


def test_refusals_and_options(model):
    ctx = PassContext(workload=tiny_llama_workload(copy.deepcopy(model)))
    with pytest.raises(PassApplyError, match="kv-cache: needs a causal-LM workload"):
        KvCachePass().apply(copy.deepcopy(model), ctx)
    with pytest.raises(PassApplyError, match="'group_size' \\(24\\) must divide the model's head_dim \\(32\\)"):
        KvCachePass(impl="quantized", group_size=24).apply(copy.deepcopy(model), CTX)
    with pytest.raises(PassConfigError, match="option 'bits' must be one of 8, 4"):
        KvCachePass(impl="quantized", bits=2)
    with pytest.raises(PassConfigError, match="option 'impl' must be one of static, quantized, dynamic"):
        KvCachePass(impl="paged")
    assert str(Pipeline.parse("kv-cache{impl=quantized,bits=4},speculative")) == "kv-cache{impl=quantized,bits=4},speculative"


def test_bytes_per_token_of_a_smollm2_shaped_config():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert bytes_per_token(config, "static", 4) == 46080  # 30 x 2 x 3 x 64 x 4 bytes
    assert bytes_per_token(config, "quantized", 4, bits=8) == 12240  # 64 codes + 2 fp16 per 64-channel group
    assert bytes_per_token(config, "quantized", 4, bits=4) == 7200  # default int4 groups: 32 channels
    assert bytes_per_token(config, "quantized", 4, bits=4, group_size=64) == 6480


def test_static_cache_serves_several_batch_sizes_in_turn():
    model = tiny_llama(vocab_size=128)
    static = KvCachePass(impl="static").apply(copy.deepcopy(model), PassContext()).model
    for batch in (1, 3, 1, 3):
        prompt = torch.randint(0, 128, (batch, 6), generator=torch.Generator().manual_seed(batch))
        want = greedy_decode(model, prompt, 5).tokens
        assert torch.equal(greedy_decode(static, prompt, 5).tokens, want)
