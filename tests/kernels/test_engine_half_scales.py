"""The decode engine with its int4 projections' unit scales and zero terms in float16: the weights it reads
stay within 1% of a quantization step of the float32 layout's, every GEMM path (VNNI rows, AMX bf16 prompt
chunks, AMX int8 decode batches, int16 activations) computes what the reference computes from them, and a
projection whose scales float16 cannot hold keeps float32."""
from __future__ import annotations

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
def model():
    return quantized(tiny(hidden=192, inter=320, heads=3, kv=1))  # odd unit counts: 3 and 5 units a row


def projections(weights):
    for blk in weights.blocks:
        yield from (blk.qkv, blk.o, blk.gate_up, blk.down)


def test_half_scales_move_no_weight_by_more_than_one_percent_of_a_step(model):
    from optistack.kernels.llama_engine import EngineWeights

    w32, w16 = EngineWeights.from_model(model), EngineWeights.from_model(model, scales="float16")
    for p32, p16 in zip(projections(w32), projections(w16)):
        assert p16.s.dtype == p16.zc.dtype == torch.float16 and p32.s.dtype == torch.float32
        assert torch.equal(p16.q, p32.q)
        err = (ref.dequant(p16) - ref.dequant(p32)).abs().reshape(p32.q.shape[0], -1, 64)
        assert bool((err <= 0.01 * p32.s[..., None]).all())
        assert p16.s.nbytes + p16.zc.nbytes == (p32.s.nbytes + p32.zc.nbytes) // 2


@pytest.mark.parametrize("act_bits", [8, 16])
def test_half_scales_decode_and_prefill_as_the_reference(model, act_bits):
    """Three slots: a prompt chunk of 40 rows (AMX bf16 tiles where present, from 32 rows), two shorter ones,
    then decode steps (VNNI)."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(model, scales="float16")
    rt = weights.runtime(3, 64, act_bits)
    amx_rows = rt.impl.amx_rows
    cos, sin = weights.rope_tables(64)
    kc, vc = torch.zeros_like(rt.k_cache), torch.zeros_like(rt.v_cache)
    g = torch.Generator().manual_seed(6)
    for b, n in enumerate((40, 5, 9)):
        rows = (torch.randint(0, 300, (n,), generator=g), torch.full((n,), b), torch.arange(n))
        got = rt.forward(*rows, torch.arange(n))
        want = ref.forward(weights, *rows, kc, vc, cos, sin, act_bits, amx_rows=amx_rows)
        ok, err = close_rows(got, want, 1e-2 if amx_rows and n >= amx_rows else 1e-3, loose=3e-2)
        assert ok, (b, err)
    tok, slots = torch.randint(0, 300, (3,), generator=g), torch.arange(3)
    for step in range(4):
        pos = torch.tensor([40, 5, 9]) + step
        got = rt.forward(tok, slots, pos, torch.arange(3))
        want = ref.forward(weights, tok, slots, pos, kc, vc, cos, sin, act_bits)
        ok, err = close_rows(got, want, 2e-3 if act_bits == 8 else 1e-3)
        assert ok, (step, err)
        tok = want.argmax(-1)


@pytest.mark.skipif(not cpu.available() or not cpu.lib().amx_supported(), reason="needs AMX tiles")
def test_half_scales_on_amx_int8_decode_batches(model):
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(model, scales="float16")
    rt = weights.runtime(9, 16)
    rt.impl.amx_batch = 8
    cos, sin = weights.rope_tables(16)
    kc, vc = torch.zeros_like(rt.k_cache), torch.zeros_like(rt.v_cache)
    g = torch.Generator().manual_seed(7)
    for b in range(9):
        rows = torch.randint(0, 300, (b + 1,), generator=g), torch.full((b + 1,), b), torch.arange(b + 1)
        rt.forward(*rows, torch.arange(0))
        ref.forward(weights, *rows, kc, vc, cos, sin)
    step = torch.randint(0, 300, (9,), generator=g), torch.arange(9), torch.arange(9) + 1
    ok, err = close_rows(rt.forward(*step, torch.arange(9)), ref.forward(weights, *step, kc, vc, cos, sin, head_bits=8),
                         1e-3, loose=2e-2)
    assert ok, err


def test_scales_float16_cannot_hold_stay_float32():
    """Scales below float16's normal range (weights ~1e-6) would lose their low bits: that projection keeps
    float32, the others still halve."""
    from optistack.kernels.llama_engine import EngineWeights

    original = tiny(hidden=128, inter=256, heads=2, kv=1, layers=1)
    with torch.no_grad():
        original.model.layers[0].mlp.down_proj.weight.mul_(1e-4)
    weights = EngineWeights.from_model(quantized(original), scales="float16")
    blk = weights.blocks[0]
    assert blk.down.s.dtype == torch.float32 and blk.qkv.s.dtype == torch.float16
    with pytest.raises(ValueError, match="scales must be 'float32' or 'float16'"):
        EngineWeights.from_model(quantized(original), scales="bfloat16")
