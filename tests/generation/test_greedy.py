"""The decode loop's protocol: metrics for one- and multi-token steps, strategies and cache factories
set on the model (also through torch.compile wrappers), and KV bytes per token."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from transformers import DynamicCache

from optistack.core.errors import WorkloadError
from optistack.core.hooks import CACHE_ATTR, DECODE_ATTR
from optistack.generation import Generation, cache_bytes_per_token, greedy_decode


def test_one_token_steps_keep_median_metrics():
    gen = Generation(torch.zeros(1, 5, dtype=torch.long), [50.0, 10.0, 12.0, 11.0, 30.0])
    m = gen.metrics()
    assert set(m) == {"ttft_ms", "tpot_ms", "tokens_per_s", "p99_token_ms", "gen_tokens"}
    assert m["ttft_ms"] == 50.0 and m["tpot_ms"] == 11.5 and m["tokens_per_s"] == pytest.approx(1000 / 11.5)
    same = Generation(gen.tokens, gen.step_ms, tokens_per_step=[1] * 5).metrics()
    assert same == m


def test_multi_token_steps_use_total_time_over_tokens():
    gen = Generation(torch.zeros(1, 7, dtype=torch.long), [50.0, 20.0, 10.0, 30.0], tokens_per_step=[1, 4, 1, 1],
                     kv_bytes_per_token=96.0)
    m = gen.metrics(include_memory=True)
    assert m["tpot_ms"] == pytest.approx(60.0 / 6) and m["tokens_per_s"] == pytest.approx(100.0)
    assert m["tokens_per_step"] == pytest.approx(2.0) and m["kv_bytes_per_token"] == 96.0
    assert m["p99_token_ms"] == pytest.approx(29.0)  # per-token times: 5, 5, 5, 5, 10, 30
    assert "kv_bytes_per_token" not in gen.metrics()
    with pytest.raises(WorkloadError, match="tokens_per_step"):
        Generation(gen.tokens, gen.step_ms, tokens_per_step=[1, 0, 1, 1]).metrics()


def test_strategy_on_the_model_replaces_the_loop_and_sees_the_compiled_wrapper():
    model = tiny_llama(vocab_size=64)
    seen = []

    def strategy(m, ids, n):
        seen.append(m)
        return Generation(torch.zeros(1, n, dtype=torch.long), [1.0] * n)

    object.__setattr__(model, DECODE_ATTR, strategy)
    ids = torch.randint(0, 64, (1, 6))
    assert greedy_decode(model, ids, 3).tokens.sum() == 0 and seen == [model]
    wrapped = torch.compile(model, backend="eager")
    greedy_decode(wrapped, ids, 3)
    assert seen[-1] is wrapped
    plain = greedy_decode(model, ids, 3, use_strategy=False)
    assert len(seen) == 2 and plain.tokens.shape == (1, 3)


def test_cache_factory_on_the_model_is_used_and_bytes_per_token_measured():
    model = tiny_llama(vocab_size=64)  # 2 layers, 2 kv heads, head_dim 16, fp32
    made = []

    def factory(m, max_len):
        made.append(max_len)
        return DynamicCache(config=m.config)

    ids = torch.randint(0, 64, (1, 6))
    ref = greedy_decode(model, ids, 4)
    assert ref.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    object.__setattr__(model, CACHE_ATTR, factory)
    gen = greedy_decode(model, ids, 4)
    assert made == [10] and torch.equal(gen.tokens, ref.tokens)
    assert cache_bytes_per_token(DynamicCache()) is None


def test_the_old_module_path_re_exports_the_decode_loop():
    import optistack.generation as new
    import optistack.workloads.generation as old

    for name in old.__all__:
        assert getattr(old, name) is getattr(new, name, None) or name in ("CACHE_ATTR", "DECODE_ATTR"), name
    assert (old.CACHE_ATTR, old.DECODE_ATTR) == (CACHE_ATTR, DECODE_ATTR)
