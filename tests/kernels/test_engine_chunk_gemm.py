"""The engine's int8 chunk GEMM (csrc/cpu/int4_vnni_gemm.cpp): a slot's prompt rows from `gemm_rows` on, where
they are not on AMX tiles. The same int8 activation codes and integer products as the VNNI rows, float sums in
another order: checked against the plain-torch reference, against the VNNI rows, and for a row's independence
from what shares its call and from the thread count. Runs on any AVX512-VNNI CPU (AMX turned off here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
import engine_reference as ref  # noqa: E402
from test_llama_engine import fresh_caches, quantized, tiny, tiny_mlp_bias  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def assert_close_but_for_flips(got, want):
    """A quarter of the rows within 1e-4, none beyond 1e-2. Where a projection's float output moves by an ulp across
    a rounding boundary of the next int8 quantization, one code flips, moves its row by ~0.5% and, in a key, every
    later row of the chunk (seen here: a flip at row 33 of 45, on the VNNI rows as on the GEMM; at row 6 of 12 on
    the GEMM only), so close_rows' "a third of the rows" does not hold; a wrong unit, row or bias moves rows by
    tens of %. The kernel itself is held to the VNNI rows' numbers in test_engine_linear.py."""
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).detach()  # the reference keeps autograd on
    assert float(err.quantile(0.25)) < 1e-4 and float(err.max()) < 1e-2, err.tolist()


def engine(weights, length: int, gemm_rows: int):
    rt = weights.runtime(3, length)
    rt.impl.amx_rows = 0
    rt.impl.gemm_rows = gemm_rows
    return rt


def biased_weights(bias: bool):
    from optistack.kernels.llama_engine import EngineWeights

    return EngineWeights.from_model(quantized(tiny_mlp_bias() if bias else tiny(layers=2)))


@pytest.mark.parametrize("rows,bias", [(12, False), (20, True), (45, False)])
def test_a_chunk_on_the_gemm_matches_the_reference_and_the_vnni_rows(rows, bias):
    """Hidden 192 and intermediate 320 (odd unit counts), 320 q|k|v rows and 640 gate|up rows (whole and partial
    panels of 32 rows on each thread), 12 / 20 / 45 rows (whole and partial blocks of six; 45 also attends as a
    chunk), beside a decode row of another slot that stays on the VNNI rows."""
    weights = biased_weights(bias)
    ids = torch.randint(0, 300, (rows,), generator=torch.Generator().manual_seed(rows))
    mixed = (torch.cat([torch.tensor([7]), ids]), torch.tensor([1] + [0] * rows),
             torch.cat([torch.tensor([0]), torch.arange(rows)]))
    cos, sin = weights.rope_tables(96)
    rt = engine(weights, 96, 12)
    kc, vc = fresh_caches(rt)
    got = rt.forward(*mixed, torch.arange(rows + 1))
    want = ref.forward(weights, *mixed, kc, vc, cos, sin)
    assert_close_but_for_flips(got, want)
    vnni = engine(weights, 96, 0).forward(*mixed, torch.arange(rows + 1))
    assert torch.equal(got[0], vnni[0])  # the decode row is on the VNNI rows in both
    assert_close_but_for_flips(got, vnni)


def test_a_rows_numbers_on_the_gemm_do_not_depend_on_its_partners_or_the_threads():
    weights = biased_weights(False)
    g = torch.Generator().manual_seed(3)
    chunk = torch.randint(0, 300, (23,), generator=g)
    alone = engine(weights, 64, 12).forward(chunk, torch.zeros(23, dtype=torch.long), torch.arange(23),
                                            torch.arange(23))
    # the same chunk in one call after two other slots' decode rows (on the VNNI rows)
    rt = engine(weights, 64, 12)
    for slot in (1, 2):
        rt.forward(torch.randint(0, 300, (5,), generator=g), torch.full((5,), slot), torch.arange(5), torch.arange(0))
    rows = (torch.cat([torch.tensor([4, 9]), chunk]), torch.tensor([1, 2] + [0] * 23),
            torch.cat([torch.tensor([5, 5]), torch.arange(23)]))
    shared = rt.forward(*rows, torch.arange(2, 25))
    assert torch.equal(shared, alone)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine(weights, 64, 12).forward(chunk, torch.zeros(23, dtype=torch.long), torch.arange(23),
                                              torch.arange(23))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, alone)


def test_gemm_rows_default_and_refusals():
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(layers=1)))
    rt8, rt16 = weights.runtime(1, 16), weights.runtime(1, 16, act_bits=16)
    assert rt8.impl.gemm_rows == (0 if cpu.lib().amx_supported() else 12)  # AMX tiles take prompt chunks there
    assert cpu.lib().gemm_rows_default == 12
    assert rt16.impl.gemm_rows == 0
    with pytest.raises(RuntimeError, match="gemm_rows must be >= 0"):
        rt8.impl.gemm_rows = -1
    with pytest.raises(RuntimeError, match="no int8 chunk GEMM"):
        rt16.impl.gemm_rows = 12
    rt16.impl.gemm_rows = 0
