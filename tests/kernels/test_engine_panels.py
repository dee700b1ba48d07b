"""The engine's int4 panels (csrc/cpu/int4_panel.cpp): its projections also stored as panels of 16 rows, which
its int8 VNNI rows (decode rows, short chunks) then read. The same codes and integer products as the row layout,
float sums in another order: checked against the plain-torch reference, against the row layout, and for a row's
independence from what shares its call and from the thread count. Runs on any AVX512-VNNI CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
import engine_reference as ref  # noqa: E402
from test_engine_chunk_gemm import assert_close_but_for_flips  # noqa: E402
from test_llama_engine import close_rows, fresh_caches, quantized, tiny, tiny_mlp_bias  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def weights_of(kind: str):
    from optistack.kernels.llama_engine import EngineWeights

    model = {"llama": lambda: tiny(), "mlp_bias": tiny_mlp_bias, "qwen2": lambda: tiny("qwen2")}[kind]()
    return EngineWeights.from_model(quantized(model))


def engine(weights, slots: int, length: int, panels: bool):
    rt = weights.runtime(slots, length, panels=panels)
    rt.impl.amx_rows = rt.impl.amx_batch = 0  # every row on the VNNI rows (AMX machines too)
    return rt


@pytest.mark.parametrize("kind", ["llama", "mlp_bias", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3, 11])
def test_decode_rows_on_panels_match_the_reference_and_the_row_layout(kind, batch):
    """Hidden 192 and intermediate 320 (odd unit counts: 3 and 5), 320 q|k|v rows, 640 gate|up rows (whole
    panels on each thread: 10 and 20 of 16 rows on two threads); 1, 3 and 11 decode rows (blocks of eight
    and every remainder below it), each slot at its own position; biases on the MLP or on q|k|v."""
    weights = weights_of(kind)
    rt, rows_rt = engine(weights, batch, 24, True), engine(weights, batch, 24, False)
    cos, sin = weights.rope_tables(24)
    kc, vc = fresh_caches(rt)
    g = torch.Generator().manual_seed(batch)
    for b in range(1, batch):  # slot b holds b positions before the steps
        prompt = (torch.randint(0, 300, (b,), generator=g), torch.full((b,), b), torch.arange(b))
        rt.forward(*prompt, torch.arange(0))
        rows_rt.forward(*prompt, torch.arange(0))
        ref.forward(weights, *prompt, kc, vc, cos, sin)
    slots = torch.arange(batch)
    tok = torch.randint(0, 300, (batch,), generator=g)
    for step in range(4):
        pos = slots + step
        got = rt.forward(tok, slots, pos, torch.arange(batch))
        want = ref.forward(weights, tok, slots, pos, kc, vc, cos, sin)
        ok, err = close_rows(got, want, 1e-3)
        assert ok, (step, err)
        assert_close_but_for_flips(got, rows_rt.forward(tok, slots, pos, torch.arange(batch)))
        tok = want.argmax(-1)


def test_a_row_on_panels_computes_the_same_alone_batched_chunked_and_on_any_thread_count():
    """Bitwise: a sequence decoded one row per call on 1 or 3 threads, as a short chunk, or beside 9 other
    slots' rows (a block of eight and a block of two) gets the same logits."""
    weights = weights_of("llama")
    ids = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(5))

    def alone(threads: int) -> torch.Tensor:
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            rt = engine(weights, 1, 16, True)
            return torch.cat([rt.forward(ids[i:i + 1], torch.tensor([0]), torch.tensor([i]), torch.tensor([0]))
                              for i in range(6)])
        finally:
            torch.set_num_threads(before)

    one_by_one = alone(1)
    assert torch.equal(alone(3), one_by_one)
    rt = engine(weights, 10, 16, True)
    rt.impl.gemm_rows = 0  # the 6-row chunk stays on the VNNI rows
    assert torch.equal(rt.forward(ids, torch.zeros(6, dtype=torch.long), torch.arange(6), torch.arange(6)), one_by_one)
    rt = engine(weights, 10, 16, True)
    g = torch.Generator().manual_seed(6)
    for i in range(6):  # row i of slot 0 at position i, always the 5th of 10 decode rows
        others = torch.randint(0, 300, (9,), generator=g)
        tok = torch.cat([others[:4], ids[i:i + 1], others[4:]])
        slots = torch.tensor([1, 2, 3, 4, 0, 5, 6, 7, 8, 9])
        got = rt.forward(tok, slots, torch.full((10,), i), torch.tensor([4]))
        assert torch.equal(got[0], one_by_one[i])


def test_panels_by_default_for_a_small_model_switchable_and_refused_for_int16_activations():
    weights = weights_of("llama")
    assert weights.runtime(1, 16).impl.panels is True  # a tiny model's codes: panels on every CPU
    x = (torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    plain = weights.runtime(1, 16, panels=False)
    assert plain.impl.panels is False
    with pytest.raises(RuntimeError, match="built without panels"):
        plain.impl.panels = True
    want = plain.forward(*x)
    rt = weights.runtime(1, 16, panels=True)
    assert rt.impl.panels is True
    got = rt.forward(*x)
    assert_close_but_for_flips(got, want)
    rt.impl.panels = False  # the same engine back on the row layout
    assert torch.equal(rt.forward(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), want)
    # panels are made once and shared by every engine of these weights
    assert weights.blocks[0].qkv.panels[0].data_ptr() == weights.blocks[0].qkv.native(cpu.lib(), True).pq.data_ptr()
    with pytest.raises(ValueError, match="panels need int8 activations"):
        weights.runtime(1, 16, act_bits=16, panels=True)
    assert weights.runtime(1, 16, act_bits=16).impl.panels is False
    rt16, cos, sin = weights.runtime(1, 16, act_bits=16), *weights.rope_tables(16)
    with pytest.raises(RuntimeError, match="int16 activations .* do not read panels"):
        cpu.lib().LlamaEngine(weights.spec(True), cos, sin, rt16.k_cache, rt16.v_cache, rt16.k_scale, rt16.v_scale, 16, 8)


def test_panels_hold_the_row_layouts_codes_and_refuse_bad_shapes():
    """An independent check of the layout (int4_panel.h) from the codes themselves, and the refusals."""
    g = torch.Generator().manual_seed(7)
    n, k = 32, 192
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    s, zc = torch.rand(n, k // 64, generator=g), torch.rand(n, k // 64, generator=g)
    pq, pf = cpu.lib().q4_panels(q, s, zc)
    units = k // 64
    # panel nb, unit u, vector v, row r, byte i = row (16 nb + r)'s byte 32 u + 4 v + i
    want = q.reshape(n // 16, 16, units, 8, 4).permute(0, 2, 3, 1, 4).reshape(-1)
    assert torch.equal(pq, want)
    scales, zeros = pf[: n * units], pf[n * units:]
    assert torch.equal(scales, s.reshape(n // 16, 16, units).transpose(1, 2).reshape(-1))
    assert torch.equal(zeros, zc.reshape(n // 16, 16, units).transpose(1, 2).reshape(-1))
    half = cpu.lib().q4_panels(q, s.half(), zc.half())[1]
    assert torch.equal(half[: n * units], s.half().float().reshape(n // 16, 16, units).transpose(1, 2).reshape(-1))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu.lib().q4_panels(q[:24], s[:24], zc[:24])
    with pytest.raises(RuntimeError, match="float32 tensor of 96 values"):
        cpu.lib().q4_panels(q, s[:, :2], zc)
