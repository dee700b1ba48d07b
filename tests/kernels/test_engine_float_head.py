"""The exact mode keeps a float head as the model's own float32 weights: quantizing it to int8 rows (what the
int8 mode does for bytes) moved a tiny Llama's logits (scale ~0.9) by ~6e-3 and changed greedy tokens where
two logits were that close, against the exact mode's promise of the quantized model's own tokens."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
import engine_reference as ref  # noqa: E402
from test_llama_engine import close_rows, quantized, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


@pytest.fixture(scope="module")
def float_head_model():
    return quantized(tiny(hidden=192, inter=320, heads=3, kv=1), "rtn-int4,fuse-kernels")


@pytest.mark.parametrize("act_bits", [8, 16])
def test_a_float_head_against_the_reference(float_head_model, act_bits):
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(float_head_model, scales="float32", float_head=True)
    head = float_head_model.get_output_embeddings().weight
    assert weights.head_q.numel() == 0 and not weights.head_quantized_here
    assert weights.float_head.data_ptr() == head.data_ptr()  # the model's own tensor, not a copy
    rt = weights.runtime(3, 40, act_bits)
    cos, sin = weights.rope_tables(40)
    kc, vc = torch.zeros_like(rt.k_cache), torch.zeros_like(rt.v_cache)
    g = torch.Generator().manual_seed(3)
    rt.impl.amx_rows = 0  # the reference's rows are the VNNI path's (int8 activations: one rounding flip moves a row ~0.5%)
    for b, n in enumerate((7, 1, 20)):  # 20 rows: a batch big enough for the AMX head, which a float head never takes
        rows = (torch.randint(0, 300, (n,), generator=g), torch.full((n,), b), torch.arange(n))
        ok, err = close_rows(rt.forward(*rows, torch.arange(n)),
                             ref.forward(weights, *rows, kc, vc, cos, sin, act_bits),
                             1e-4 if act_bits == 16 else 1e-2, loose=1e-3 if act_bits == 16 else 2e-2)
        assert ok, (b, err)


def test_the_exact_mode_keeps_the_float_head_and_the_models_own_logits(float_head_model):
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    exact = Pipeline.parse("decode-engine{act=int16,check_prompts=0}").apply(copy.deepcopy(float_head_model),
                                                                              PassContext())
    assert exact.info["decode-engine.head"] == "float32 (the model's own)"
    fast = Pipeline.parse("decode-engine{check_prompts=0}").apply(copy.deepcopy(float_head_model), PassContext())
    assert fast.info["decode-engine.head"] == "int8 (quantized by this pass)"  # the int8 mode trades it for bytes
    from transformers import GenerationMixin

    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
              eos_token_id=[], pad_token_id=0)
    for seed in range(4):
        ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(seed))
        want = GenerationMixin.generate(float_head_model, ids, **kw)
        got = exact.model.generate(ids, **kw)
        assert exact.model.generate.last["session"] == "EngineSession"
        assert torch.equal(got.sequences, want.sequences), seed
        err = max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits))
        assert err < 2e-4, (seed, err)  # the int8 head: ~6e-3
