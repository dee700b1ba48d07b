"""The cpu-cpp int8 weight-only matmul (the int8 lm_head) against the float reference.

The kernel rounds each activation row to 15 bits (int16, one scale per row) and multiplies in
integers; against the float product of the same int8 weight that stays within 1e-4 relative
(bf16 outputs: the bf16 bar). Shapes: SmolLM2's head (576 -> 49152, cut down in N), batches 1-8,
K that is no multiple of 32, and K longer than one int32 accumulation run (4096).
"""
import pytest
import torch
from cpu_built import built, rel_err  # noqa: F401  (built: the autouse fixture)

from optistack.kernels import cpu
from optistack.kernels import reference as ref


def weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) * 0.02 + 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("m,n,k", [(1, 3000, 576), (2, 517, 576), (3, 64, 200), (5, 33, 31), (8, 256, 576),
                                   (1, 40, 9000)])
def test_int8_matmul_matches_reference(dtype, tol, m, n, k):
    q, s = weights(n, k, m * n + k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 2).to(dtype)
    got = cpu.int8_matmul(x, q, s)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, ref.int8_matmul(x, q, s)) < tol


def test_int8_matmul_keeps_leading_dims_zero_rows_and_nan():
    q, s = weights(48, 64)
    x = torch.randn(2, 3, 64)
    x[0, 1] = 0.0
    x[1, 2, 5] = float("nan")
    got = cpu.int8_matmul(x, q, s)
    want = ref.int8_matmul(x, q, s)
    assert got.shape == (2, 3, 48)
    assert torch.equal(got[0, 1], torch.zeros(48))
    assert torch.isnan(got[1, 2]).all()
    ok = torch.isfinite(want)
    assert rel_err(got[ok], want[ok]) < 1e-4


def test_int8_matmul_rejects_bad_weights():
    x = torch.randn(1, 64)
    q, s = weights(8, 64)
    with pytest.raises(RuntimeError, match="qweight must be a contiguous int8"):
        cpu.int8_matmul(x, q.float(), s)
    with pytest.raises(RuntimeError, match="one value per output row"):
        cpu.int8_matmul(x, q, s[:4])


def test_int8_matmul_traces_under_compile_without_graph_breaks():
    q, s = weights(96, 64)
    x = torch.randn(2, 64)
    explanation = torch._dynamo.explain(lambda t: cpu.int8_matmul(t, q, s) * 2)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
