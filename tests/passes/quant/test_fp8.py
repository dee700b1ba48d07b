"""`fp8`: E4M3 Linear quantization (weight-only and dynamic W8A8) with SQNR floors and byte counts."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from tiny_models import tiny_llama as _tiny_llama
from torch import nn

from optistack.bench.memory import model_bytes
from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.layers.fp8 import E4M3, Fp8Linear
from optistack.passes.quant.fp8 import Fp8Pass
from optistack.testing import sqnr

CTX = PassContext()
# Floors measured on the random data below: weight-only ~32 dB, dynamic ~29 dB (e4m3 keeps 3 mantissa
# bits, so each value carries up to ~6% relative rounding error; quantizing activations adds a second one).
SQNR_FLOOR = {"weight-only": 28.0, "dynamic": 25.0}


def tiny_llama():
    return _tiny_llama(vocab_size=128)


def linear_and_input():
    torch.manual_seed(0)
    return nn.Linear(256, 128), torch.randn(2, 32, 256)


@pytest.mark.parametrize("scale", ["mse", "amax"])
@pytest.mark.parametrize("mode", ["weight-only", "dynamic"])
def test_fp8_linear_sqnr_floor(mode, scale):
    lin, x = linear_and_input()
    q = Fp8Linear.from_linear(lin, mode=mode, scale=scale)
    assert q.weight_fp8.dtype == E4M3 and q.weight_scale.shape == (128, 1)
    with torch.no_grad():
        assert sqnr(lin(x), q(x)) >= SQNR_FLOOR[mode]


def test_weight_only_error_is_the_weight_rounding_only():
    lin, x = linear_and_input()
    q = Fp8Linear.from_linear(lin)
    with torch.no_grad():
        w = q.dequantized_weight()
        assert torch.allclose(q(x), nn.functional.linear(x, w, lin.bias), atol=1e-5)
        # per-channel scale: each row's largest |w| round-trips within one e4m3 step
        assert torch.allclose(w.abs().amax(1), lin.weight.abs().amax(1), rtol=1 / 16)


def test_mse_scale_search_is_never_worse_than_amax():
    lin, _ = linear_and_input()
    w = lin.weight.detach()
    err = {}
    for scale in ("mse", "amax"):
        err[scale] = (Fp8Linear.from_linear(lin, scale=scale).dequantized_weight() - w).square().sum(1)
    assert (err["mse"] <= err["amax"]).all() and err["mse"].sum() < 0.95 * err["amax"].sum()
    amax = Fp8Linear.from_linear(lin, scale="amax")
    assert torch.allclose(amax.weight_fp8.float().abs().amax(1), torch.full((128,), 448.0))


def test_scaled_mm_path_matches_emulated():
    # The CUDA path (torch._scaled_mm, row-wise scales, column-major weight) also runs on CPU torch,
    # so its scale shapes and layout are exercised here even though the pass only picks it on CUDA >= 8.9.
    lin, x = linear_and_input()
    emulated = Fp8Linear.from_linear(lin, mode="dynamic")
    fast = Fp8Linear.from_linear(lin, mode="dynamic", kernel="scaled_mm")
    with torch.no_grad():
        out = fast(x)
        assert out.shape == (2, 32, 128) and out.dtype == x.dtype
        assert sqnr(emulated(x), out) >= 40.0  # bf16 output rounding only
        assert sqnr(lin(x), out) >= SQNR_FLOOR["dynamic"]


def test_zero_rows_and_tokens_stay_finite():
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[3] = 0
    q = Fp8Linear.from_linear(lin, mode="dynamic")
    x = torch.randn(4, 32)
    x[1] = 0
    out = q(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 3], lin.bias[3].expand(4))


@pytest.mark.parametrize("mode", ["weight-only", "dynamic"])
def test_pass_on_llama_skips_lm_head_and_shrinks_bytes(mode):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
    before = model_bytes(model)
    result = Fp8Pass(mode=mode).apply(copy.deepcopy(model), CTX)
    info = result.info
    assert result.modified and info["kernel"] == "emulated" and info["mode"] == mode
    assert info["linears_quantized"] == 14 and info["linears_skipped"] == 1
    q = result.model
    assert isinstance(q.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert isinstance(q.lm_head, nn.Linear)
    # Linear weights 4 bytes -> 1 byte per value, plus one float32 scale per output channel
    assert info["quantized_bytes_after"] < info["quantized_bytes_before"] / 3.5
    assert before - model_bytes(q) == info["quantized_bytes_before"] - info["quantized_bytes_after"]
    with torch.no_grad():
        assert sqnr(ref, q(ids).logits) >= SQNR_FLOOR[mode] - 5  # two stacked blocks compound the error


def test_tied_weights_stay_float():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    result = Fp8Pass(skip="").apply(model, CTX)
    assert isinstance(model.lm_head, nn.Linear) and result.info["linears_skipped"] == 1
    assert result.info["linears_tied_left"] == 1 and "lm_head shares its weight with model.embed_tokens" \
        in result.info["tied_reason"]


def test_model_copies_pickles_and_saves():
    lin, x = linear_and_input()
    model = nn.Sequential(lin)
    Fp8Pass().apply(model, CTX)
    with torch.no_grad():
        want = model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for copy_ in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
            assert copy_[0].weight_fp8.dtype == E4M3 and torch.equal(copy_(x), want)


def test_skip_min_features_and_honest_no_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    result = Fp8Pass(skip="^0$").apply(model, CTX)
    assert not result.modified and result.info["linears_quantized"] == 0 and result.info["linears_skipped"] == 2
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    result = Fp8Pass(skip="").apply(model, CTX)
    assert result.info["linears_quantized"] == 1 and isinstance(model[0], Fp8Linear) and isinstance(model[2], nn.Linear)


def test_no_linears_is_nothing_to_change():
    result = Fp8Pass().apply(nn.Sequential(nn.Conv1d(4, 4, 3)), CTX)
    assert not result.modified and result.info["reason"].startswith("nothing to change: the model has no nn.Linear")
    with pytest.raises(PassApplyError, match="^fp8: expected a torch.nn.Module"):
        Fp8Pass().apply(object(), CTX)


def test_bad_options_name_pass_and_option():
    with pytest.raises(PassConfigError, match=r"^fp8: option 'mode' must be one of weight-only, dynamic"):
        Fp8Pass(mode="static")
    with pytest.raises(PassConfigError, match=r"^fp8: option 'skip' must be a regular expression"):
        Fp8Pass(skip="(")
    with pytest.raises(PassConfigError, match=r"^fp8: option 'min_features' must be >= 1"):
        Fp8Pass(min_features=0)
    with pytest.raises(PassConfigError, match=r"^fp8: option 'scale' must be one of mse, amax"):
        Fp8Pass(scale="max")


def test_text_round_trips():
    assert str(Fp8Pass()) == "fp8"
    p = Fp8Pass(mode="dynamic", skip="", min_features=32, scale="amax")
    [(name, opts)] = parse_pipeline_text(str(p))
    assert name == "fp8" and Fp8Pass(**opts) == p


@pytest.mark.gpu
def test_scaled_mm_kernel_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm fp8 needs compute capability >= 8.9")
    lin, x = linear_and_input()
    model = nn.Sequential(lin).cuda()
    x = x.cuda()
    with torch.no_grad():
        ref = model(x)
        result = Fp8Pass(mode="dynamic", skip="").apply(model, PassContext(device="cuda"))
        assert result.info["kernel"] == "scaled_mm" and result.info["linears_emulated"] == 0
        assert sqnr(ref, model(x)) >= SQNR_FLOOR["dynamic"]


def test_weight_property_is_the_dequantized_weight_read_only():
    lin, x = linear_and_input()
    layer = Fp8Linear.from_linear(lin)
    w = layer.weight
    assert w.shape == lin.weight.shape and w.dtype == lin.weight.dtype and w.device == lin.weight.device
    assert torch.equal(w, layer.dequantized_weight())
    with pytest.raises((AttributeError, KeyError), match="weight"):  # nn.Module refuses a Parameter by KeyError
        layer.weight = nn.Parameter(torch.zeros_like(lin.weight))
    assert "weight" not in layer.state_dict()
    assert pickle.loads(pickle.dumps(layer)).weight.dtype == lin.weight.dtype


def test_chosen_linears_sharing_one_weight_share_one_replacement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False))
    model[2].weight = model[0].weight
    before = model_bytes(model)
    result = Fp8Pass(min_features=1).apply(model, CTX)
    assert result.info["linears_quantized"] == 2 and model[0] is model[2] and isinstance(model[0], Fp8Linear)
    assert model_bytes(model) < before
