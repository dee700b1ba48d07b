"""The decode engine with an int4 head (`head=int4`): the head is one more projection in the engine layout
(int16 activations), half the int8 head's bytes a token; the engine computes what the reference computes
from the same weights, and the pass keeps the exact mode's identity with the model's own decoding."""
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
def base():
    return tiny(hidden=192, inter=320, heads=3, kv=1)


@pytest.mark.parametrize("act_bits,scales", [(8, "float16"), (16, "float32")])
def test_int4_head_against_the_reference(base, act_bits, scales):
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(base, "rtn-int4{head=int4},fuse-kernels"), scales=scales)
    assert weights.head4 is not None and weights.head_q.numel() == 0
    assert weights.head4.q.shape == (300, 96)  # float16 scales where they hold the weights within 1% of a step
    rt = weights.runtime(2, 32, act_bits)
    cos, sin = weights.rope_tables(32)
    kc, vc = torch.zeros_like(rt.k_cache), torch.zeros_like(rt.v_cache)
    g = torch.Generator().manual_seed(8)
    for b, n in enumerate((6, 3)):
        rows = (torch.randint(0, 300, (n,), generator=g), torch.full((n,), b), torch.arange(n))
        ok, err = close_rows(rt.forward(*rows, torch.arange(n)), ref.forward(weights, *rows, kc, vc, cos, sin, act_bits),
                             2e-3, loose=2e-2)
        assert ok, (b, err)
    step = torch.randint(0, 300, (2,), generator=g), torch.arange(2), torch.tensor([6, 3])
    ok, err = close_rows(rt.forward(*step, torch.arange(2)), ref.forward(weights, *step, kc, vc, cos, sin, act_bits),
                         2e-3)
    assert ok, err


def test_the_int4_heads_weights_are_the_models_and_take_half_the_int8_bytes(base):
    from optistack.kernels.llama_engine import EngineWeights

    model4 = quantized(base, "rtn-int4{head=int4}")
    w4 = EngineWeights.from_model(model4)
    w8 = EngineWeights.from_model(quantized(base, "rtn-int4{head=int8}"))
    head = model4.get_output_embeddings()
    want = head.dequantized_weight() if hasattr(head, "dequantized_weight") else head.weight
    assert torch.allclose(ref.dequant(w4.head4), want.float(), atol=1e-6)
    head8 = w8.head_q.numel() + 4 * w8.head_s.numel()
    head4 = w4.head4.q.numel() + w4.head4.s.nbytes + w4.head4.zc.nbytes
    assert head4 <= 0.65 * head8  # float32 unit scales: 40 bytes a 64-weight unit against ~64 + a row scale


def test_the_pass_runs_an_int4_head_and_keeps_the_exact_modes_identity(base):
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode
    from optistack.kernels.engine_linear import EngineInt4Linear

    chain = "rtn-int4{head=int4},fuse-kernels,decode-engine{act=int16,check_prompts=1,share_weights=yes}"
    result = Pipeline.parse(chain).apply(copy.deepcopy(base), PassContext())
    model = result.model
    assert result.info["decode-engine.head"] == "int4"
    assert isinstance(model.get_output_embeddings(), EngineInt4Linear)  # shared with the engine as well
    prompt = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(9))
    assert torch.equal(greedy_decode(model, prompt, 12).tokens,
                       greedy_decode(model, prompt, 12, use_strategy=False).tokens)
