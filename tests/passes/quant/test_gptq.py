"""`gptq`: Hessian-based error-correcting int4 rounding (one linear layer on correlated inputs, tiny
random Llama / GPT-2 block by block, awq's scales then gptq's rounding)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_awq import CTX, VOCAB, held_out_ids, logits, tiny_llama
from tiny_models import tiny_gpt2
from torch import nn

from optistack.core.errors import PassConfigError, PreconditionError
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.layers.int4 import Int4Linear
from optistack.layers.int4_grid import quantize
from optistack.passes.quant import gptq_solver
from optistack.passes.quant.awq import AwqPass
from optistack.passes.quant.gptq import GptqPass
from optistack.passes.quant.rtn import RtnInt4Pass

FAST = {"calib_samples": 8, "calib_seq_len": 32}


class Activations:
    """A workload stand-in whose calibration inputs are float activations with correlated channels
    (mixed by a fixed matrix) and a few loud ones, as an LLM's are."""

    def __init__(self, width: int = 256, tokens: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
        self.mix[:, :6] *= 8.0
        self.width, self.tokens, self.seed = width, tokens, seed

    def calibration_inputs(self, n: int):
        g = torch.Generator().manual_seed(self.seed + 1)
        return [((torch.randn(1, self.tokens, self.width, generator=g) @ self.mix,), {}) for _ in range(n)]


def output_error(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    """||X W^T - X Q^T|| with Q the stored int4 weight, dequantized (not through the bf16 kernel)."""
    layer = model[0]
    w = layer.dequantized_weight() if isinstance(layer, Int4Linear) else layer.weight
    return float((x @ w.t() - ref).norm())


@pytest.mark.parametrize("options", [
    {"group_size": 128, "clip": False},
    {"group_size": 64, "zero_grid": "float"},
    {"group_size": 32, "zero_point": False},
    {"group_size": 64, "act_order": True},
    {"group_size": 128, "zero_grid": "float", "act_order": True, "clip": False},
    {"group_size": 64, "act_order": True, "zero_grid": "float"},
])
def test_layer_output_error_is_below_round_to_nearest_on_the_same_grid(options):
    work = Activations()
    layer = nn.Sequential(nn.Linear(256, 64))
    x = torch.cat([a[0][0] for a in work.calibration_inputs(8)]).reshape(-1, 256)
    with torch.no_grad():
        ref = x @ layer[0].weight.t()
    grid = {k: v for k, v in options.items() if k not in ("act_order", "clip")}
    rtn = RtnInt4Pass(**grid).apply(copy.deepcopy(layer), PassContext(work)).model
    result = GptqPass(**options, calib_samples=8).apply(copy.deepcopy(layer), PassContext(work))
    assert isinstance(result.model[0], Int4Linear) and result.info["calibration"] == "single-pass"
    err_gptq, err_rtn = output_error(result.model, x, ref), output_error(rtn, x, ref)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    assert result.info["output_error_ratio"] < 0.7
    with torch.no_grad():  # the kernel runs what was stored
        kernel_out = result.model(x)
    assert torch.allclose(kernel_out, x @ result.model[0].dequantized_weight().t() + result.model[0].bias,
                          rtol=0.05, atol=0.05 * float(ref.abs().mean()))


@pytest.mark.parametrize("zero_point", [True, False, "float"])
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_round_to_nearest_code_for_code(zero_point, act_order):
    """With H a multiple of the identity there is no error to spread: GPTQ is RTN, on the same grid
    functions, padding (96 columns in groups of 64) included."""
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    gq, _ = gptq_solver.gptq_quantize(w, torch.eye(96) * 3, 64, zero_point, torch.bfloat16, act_order=act_order)
    ref = quantize(w, 64, zero_point, torch.bfloat16)
    assert torch.equal(gq.q, ref.q) and torch.equal(gq.scale, ref.scale) and torch.equal(gq.zero, ref.zero)


def test_block_by_block_on_a_tiny_llama_beats_rtn():
    model = tiny_llama()
    ids = held_out_ids()
    ref = logits(model, ids)
    rtn = RtnInt4Pass(group_size=32).apply(copy.deepcopy(model), CTX).model
    result = GptqPass(group_size=32, **FAST).apply(copy.deepcopy(model), CTX)
    info = result.info
    assert result.modified and info["calibration"] == "sequential"
    assert (info["layers_quantized"], info["layers_skipped"], info["calib_samples"], info["calib_seq_len"]) == (14, 1, 8, 32)
    assert 0 < info["output_error_ratio"] < 1 and info["layers_uncalibrated"] == 0 and info["quantize_seconds"] > 0
    assert {"output_error_ratio_q_proj", "output_error_ratio_down_proj", "worst_layer"} <= set(info)
    assert type(result.model.lm_head) is nn.Linear
    assert all(isinstance(m, Int4Linear) for n, m in result.model.model.layers.named_modules() if n.endswith("_proj"))
    mse_rtn = float((logits(rtn, ids) - ref).pow(2).mean())
    mse_gptq = float((logits(result.model, ids) - ref).pow(2).mean())
    assert mse_gptq < 0.7 * mse_rtn, (mse_gptq, mse_rtn)


def test_conv1d_blocks_and_a_tied_int4_head():
    model = tiny_gpt2(vocab_size=VOCAB)
    ids = held_out_ids()
    ref = logits(model, ids)
    result = GptqPass(group_size=32, head="int4", **FAST).apply(copy.deepcopy(model), CTX)
    assert result.info["calibration"] == "sequential" and result.info["layers_quantized"] == 9  # 8 + the head
    assert result.info["conv1d_converted"] == 8 and result.info["head"] == "int4"
    assert float((logits(result.model, ids) - ref).pow(2).mean()) < 0.05 * float(ref.pow(2).mean())


def test_awq_scales_then_gptq_rounding():
    model = tiny_llama()
    ids = held_out_ids()
    ref = logits(model, ids)
    awq = {"group_size": 32, "quantize": False, **FAST, "search_samples": 2, "n_grid": 5}
    scaled = AwqPass(**awq).apply(copy.deepcopy(model), CTX)
    assert scaled.modified and scaled.info["quantize"] is False
    assert scaled.info["layers_scaled"] == 12  # not o_proj: no exact fold under grouped-query attention
    assert not any(isinstance(m, Int4Linear) for m in scaled.model.modules())
    assert torch.allclose(logits(scaled.model, ids), ref, atol=1e-4, rtol=1e-4)  # scales fold exactly
    both = Pipeline.parse(f"{AwqPass(**awq)},{GptqPass(group_size=32, **FAST)}").apply(copy.deepcopy(model), CTX)
    rtn = RtnInt4Pass(group_size=32).apply(copy.deepcopy(model), CTX).model
    assert all(isinstance(m, Int4Linear) for n, m in both.model.model.layers.named_modules() if n.endswith("_proj"))
    mse_both = float((logits(both.model, ids) - ref).pow(2).mean())
    assert mse_both < 0.7 * float((logits(rtn, ids) - ref).pow(2).mean())


def test_gptq_after_int4_rounding_says_what_to_run_instead():
    rounded = RtnInt4Pass(group_size=32).apply(tiny_llama(), CTX).model  # what a plain `awq` leaves too
    result = GptqPass(**FAST).apply(rounded, CTX)
    assert not result.modified and "awq{quantize=false},gptq" in result.info["reason"]


def test_a_failure_midway_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_llama()
    ids = held_out_ids()
    ref = logits(model, ids)
    real, calls = gptq_solver.gptq_quantize, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the second block
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_solver, "gptq_quantize", failing)
    with pytest.raises(RuntimeError, match="boom"):
        GptqPass(**FAST).apply(model, CTX)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("options,match", [
    ({"block_size": 0}, "gptq: option 'block_size' must be between 1 and 4096"),
    ({"damp": 0}, r"gptq: option 'damp' must be in \(0, 1\]"),
    ({"damp": 1.5}, r"gptq: option 'damp' must be in \(0, 1\]"),
    ({"group_size": 48}, "gptq: option 'group_size' must be one of 32, 64, 128, 256"),
    ({"calib_samples": 0}, "gptq: option 'calib_samples' must be >= 1"),
    ({"zero_grid": "half"}, "gptq: option 'zero_grid' must be one of integer, float"),
])
def test_bad_options_name_the_pass(options, match):
    with pytest.raises(PassConfigError, match=match):
        GptqPass(**options)
    text = ",".join(f"{k}={v}" for k, v in options.items())
    with pytest.raises(PassConfigError, match=match):
        Pipeline.parse(f"gptq{{{text}}}")


def test_no_calibration_data_is_refused():
    with pytest.raises(PreconditionError, match="gptq: needs a workload with calibration inputs"):
        GptqPass(**FAST).apply(tiny_llama(), PassContext())


def test_text_form_round_trips():
    p = GptqPass(group_size=128, act_order=True, zero_grid="float")
    assert str(p) == "gptq{group_size=128,zero_grid=float,act_order=true}"
    assert Pipeline.parse(str(p)).passes == [p]


@pytest.mark.parametrize("k", [7, 513, 1100])
def test_the_inverse_factor_is_the_cholesky_factor_of_the_damped_inverse(k):
    """U (upper, positive diagonal) with U^T U = (H + damp mean(diag H) I)^-1, against torch's own inverse and
    Cholesky of it (float64); sizes around the halving's 512-wide leaves."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2 * k, k, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, k, dtype=torch.float64)
    h = 2 * x.T @ x / x.shape[0]
    u, used, retries = gptq_solver.inverse_cholesky(h, 0.01)
    hd = h + 0.01 * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    assert used == 0.01 and retries == 0 and torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    m = torch.linalg.cholesky(hd)
    assert torch.allclose(gptq_solver.lower_triangular_inverse(m), torch.linalg.inv(m), rtol=1e-9, atol=1e-12)
