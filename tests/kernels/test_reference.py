"""The plain-torch references agree with independent formulations (transformers' Llama modules,
optistack's Int4Linear, Fp8Linear): every backend is tested against these."""
import pytest
import torch
import torch.nn.functional as F

from optistack.kernels import reference as ref
from optistack.layers.int4 import DEQUANT, Int4Linear


def test_rms_norm_matches_llama_rmsnorm_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(577, eps=1e-5)
    norm.weight.data = torch.randn(577)
    x = torch.randn(3, 5, 577)
    torch.testing.assert_close(ref.rms_norm(x, norm.weight, 1e-5), norm(x), rtol=1e-6, atol=1e-6)


def test_rms_norm_with_residual_returns_norm_of_sum_and_sum():
    x, r, w = torch.randn(4, 64).bfloat16(), torch.randn(4, 64).bfloat16(), torch.randn(64)
    y, h = ref.rms_norm(x, w, 1e-6, residual=r)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref.rms_norm(x + r, w, 1e-6))


def test_rms_norm_bf16_is_computed_in_fp32():
    x = (torch.randn(2, 256) * 100).bfloat16()
    w = torch.rand(256).bfloat16()
    expect = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).bfloat16()
    assert torch.equal(ref.rms_norm(x, w, 1e-6), expect)


def test_swiglu():
    g, u = torch.randn(7, 33), torch.randn(7, 33)
    torch.testing.assert_close(ref.swiglu(g, u), g * torch.sigmoid(g) * u)
    gb, ub = g.bfloat16(), u.bfloat16()
    assert ref.swiglu(gb, ub).dtype == torch.bfloat16
    torch.testing.assert_close(ref.swiglu(gb, ub).float(), F.silu(gb.float()) * ub.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_matmul_matches_int4linear(group):
    lin = torch.nn.Linear(192, 48, bias=False)
    q = Int4Linear.from_linear(lin, group, kernel=DEQUANT)
    sz = q.scales_and_zeros.float()
    x = torch.randn(3, 192)
    y = ref.int4_matmul(x, q.codes(), sz[..., 0].t(), sz[..., 1].t(), group)
    torch.testing.assert_close(y, q(x), rtol=1e-5, atol=1e-5)
    packed = ref.int4_prepack(q.codes(), sz[..., 0].t(), sz[..., 1].t(), group)
    torch.testing.assert_close(ref.int4_matmul_packed(x, packed, group, 48, 192), y)


def test_int4_rejects_k_not_multiple_of_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        ref.int4_dequantize(torch.zeros(4, 40, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 32)


def test_fp8_scaled_matmul_matches_dequantized_product():
    from optistack.layers.fp8 import quantize_rows

    x, w = torch.randn(5, 64), torch.randn(24, 64)
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    y = ref.fp8_scaled_matmul(xq, wq, xs, ws.t(), torch.float32)
    expect = (xq.float() * xs) @ (wq.float() * ws).t()
    torch.testing.assert_close(y, expect)
    assert (y - x @ w.t()).abs().max() < 0.15 * (x @ w.t()).abs().max()  # fp8 is close to the float product
