"""`mixed-precision`: bits counted as stored, the knapsack against brute force, the loss gradients against
a direct autograd, a tiny Llama under a budget (vs uniform int4 g64), failures, options, search."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from test_awq import CTX, VOCAB, held_out_ids, logits
from tiny_models import tiny_llama as _tiny_llama
from torch import nn

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pipeline import Pipeline
from optistack.layers.int4 import Int4Linear
from optistack.layers.int8 import Int8Linear
from optistack.passes.quant import gptq_solver
from optistack.passes.quant.gptq import calibration
from optistack.passes.quant.mixed_precision import MixedPrecisionPass, stored_layer_bits
from optistack.passes.quant.mixed_precision_probe import loss_moments, shared_inputs
from optistack.passes.quant.mixed_precision_select import Unit, select, stored_bits
from optistack.passes.quant.rtn import RtnInt4Pass

FAST = {"calib_samples": 8, "calib_seq_len": 32}
PROBE = {"calib_samples": 4, "calib_seq_len": 32}


def tiny_llama(seed: int = 0) -> nn.Module:
    """Hidden 128 / MLP 256 (so groups of 32..128 differ), a few loud input channels after each norm."""
    model = _tiny_llama(vocab_size=VOCAB, seed=seed, hidden_size=128, intermediate_size=256)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(128, generator=g)[:4]] *= 8.0
    return model


@pytest.mark.parametrize("choice", ["int4-g32", "int4-g64", "int4-g128", "int4-g256", "int8", "float"])
@pytest.mark.parametrize("shape", [(32, 96), (48, 256), (40, 96)])  # 96 pads; 40 rows: no int4 kernel (float32 scales)
def test_bits_counted_before_building_are_what_the_built_layer_stores(choice, shape):
    lin = nn.Linear(shape[1], shape[0])
    if choice.startswith("int4"):
        built = Int4Linear.from_linear(lin, int(choice.removeprefix("int4-g")))
    else:
        built = Int8Linear.from_linear(lin) if choice == "int8" else lin
    assert stored_bits(choice, shape[0], shape[1], "cpu") == stored_layer_bits(built)


def test_int4_g64_costs_four_and_a_half_bits_on_the_int4_kernel():
    assert stored_bits("int4-g64", 64, 256, "cpu") / (64 * 256) == 4.5


def _best(units: list[Unit], budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(*[list(u.cost) for u in units]):
        if sum(u.cost[c] for u, c in zip(units, combo)) <= budget:
            best = min(best, sum(u.sens[c] for u, c in zip(units, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_selection_keeps_the_budget_and_comes_close_to_brute_force(seed):
    rng = random.Random(seed)
    units = []
    for _ in range(6):
        w = rng.choice([100, 300, 900])
        base = rng.uniform(0.1, 10)
        cost = {"int4-g128": int(4.25 * w), "int4-g64": int(4.5 * w), "int4-g32": 5 * w, "int8": 8 * w}
        sens = {"int4-g128": base * 1.3, "int4-g64": base, "int4-g32": base * rng.uniform(0.5, 0.9), "int8": base * 0.01}
        units.append(Unit(["x"], w, cost, sens))
    weights = sum(u.weights for u in units)
    for bits in (4.3, 4.5, 5.0, 6.0):
        picked = select(units, bits * weights)
        assert sum(u.cost[picked[i]] for i, u in enumerate(units)) <= bits * weights
        got = sum(u.sens[picked[i]] for i, u in enumerate(units))
        assert got <= 1.1 * _best(units, bits * weights) + 1e-9, (bits, got)


def test_loss_gradients_and_weighted_moments_match_a_direct_autograd():
    """f_i = mean over tokens of (dL/dy_i)^2 and H = sum_t |g_t|^2 x_t x_t^T / sum_t |g_t|^2, checked against the
    gradient of a zero added to one layer's output and the layer's input captured by a hook."""
    model = tiny_llama()
    batches, _ = calibration(model, CTX, MixedPrecisionPass(**PROBE).config, "test")
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    moments, why = loss_moments(model, batches, {name: layer, "model.layers.0.self_attn.q_proj":
                                                 model.model.layers[0].self_attn.q_proj})
    assert not why and all(p.grad is None for p in model.parameters())
    total, tokens = torch.zeros(layer.out_features, dtype=torch.float64), 0
    h, a_sum = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64), 0.0
    for _, kwargs in batches:
        ids = kwargs["input_ids"]
        delta = torch.zeros(*ids.shape, layer.out_features, requires_grad=True)
        seen = []
        handle = layer.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()) or out + delta)
        logits_ = model(input_ids=ids, use_cache=False).logits
        handle.remove()
        loss = nn.functional.cross_entropy(logits_[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (g,) = torch.autograd.grad(loss, [delta])
        sq = g.reshape(-1, layer.out_features).double().pow(2)
        total += sq.sum(0)
        x = seen[0].reshape(-1, layer.in_features).double()
        h += (x * sq.sum(1)[:, None]).t() @ x
        a_sum += float(sq.sum())
        tokens += ids.numel()
    f, hw = moments[name]
    assert torch.allclose(f, total / tokens, rtol=1e-3, atol=1e-12)
    assert torch.allclose(hw.double(), h / a_sum, rtol=1e-3, atol=1e-6 * float((h / a_sum).abs().max()))


def test_layers_reading_one_input_are_grouped():
    model = tiny_llama()
    batches, _ = calibration(model, CTX, MixedPrecisionPass(**FAST).config, "test")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers.0" in n}
    assert [[n.rsplit(".", 1)[-1] for n in g] for g in shared_inputs(model, batches[0], layers)] == [
        ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_under_the_budget_of_uniform_int4_g64_it_beats_it(method):
    model = tiny_llama()
    ids = held_out_ids()
    ref = logits(model, ids)
    uniform = RtnInt4Pass(group_size=64).apply(copy.deepcopy(model), CTX)
    result = MixedPrecisionPass(bits=4.5, method=method, **FAST).apply(copy.deepcopy(model), CTX)
    info = result.info
    assert result.modified and info["bits_per_weight"] <= 4.5 and info["layers_quantized"] == 14
    assert info["bits_per_weight"] == uniform.info["bits_per_weight"] == 4.5  # the budget is spent, counted alike
    used = {v.split(" ")[0] for k, v in info.items() if k.startswith("choice ")}
    assert len(used) >= 2 and info["sensitivity"] == "fisher" and info["predicted_loss_increase"] > 0
    assert info["predicted_loss_increase"] < info["predicted_loss_increase_all_int4-g64"]
    for name, m in result.model.named_modules():  # every layer is the type its choice names
        if f"choice {name}" in info:
            kind = info[f"choice {name}"].split(" ")[0]
            assert isinstance(m, Int8Linear if kind == "int8" else Int4Linear)
            assert kind == "int8" or m.group_size == int(kind.removeprefix("int4-g"))
    attn = result.model.model.layers[0].self_attn  # tied: q, k and v took one choice
    assert len({info[f"choice model.layers.0.self_attn.{p}"].split(" ")[0] for p in ("q_proj", "k_proj", "v_proj")}) == 1
    mse_mp = float((logits(result.model, ids) - ref).pow(2).mean())
    mse_uniform = float((logits(uniform.model, ids) - ref).pow(2).mean())
    assert mse_mp < mse_uniform, (mse_mp, mse_uniform)
    assert attn.q_proj is not None


def test_a_generous_budget_buys_int8_everywhere(monkeypatch):
    from optistack.passes.quant import head

    monkeypatch.setattr(head, "int8_kernel", lambda: "torch")  # no C++ build in this test
    result = MixedPrecisionPass(bits=8.3, method="rtn", **FAST).apply(tiny_llama(), CTX)
    assert result.info["layers_int8"] == 14 and result.info["bits_per_weight"] <= 8.3
    assert all(m.kernel == "torch" for m in result.model.modules() if isinstance(m, Int8Linear))


def test_a_budget_below_the_cheapest_choice_is_refused_and_the_model_untouched():
    model = tiny_llama()
    with pytest.raises(PassApplyError, match=r"mixed-precision: bits=4.0 is below what the cheapest of choices="):
        MixedPrecisionPass(bits=4.0, **FAST).apply(model, CTX)
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules())
    with pytest.raises(PassApplyError, match=r"below what the cheapest"):  # checked before any calibration
        MixedPrecisionPass(bits=4.4, choices="int4-g64+int8", **FAST).apply(model, None)


def test_a_failure_midway_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_llama()
    ids = held_out_ids()
    ref = logits(model, ids)
    real, calls = gptq_solver.gptq_quantize, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_solver, "gptq_quantize", failing)
    with pytest.raises(RuntimeError, match="boom"):
        MixedPrecisionPass(bits=5.0, **FAST).apply(model, CTX)
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("options,match", [
    ({"bits": 0.5}, "mixed-precision: option 'bits' must be a number of bits per weight between 1 and 32"),
    ({"choices": "int4-g48+int8"}, "mixed-precision: option 'choices' takes '\\+'-separated choices from"),
    ({"choices": "int8+int8"}, "mixed-precision: option 'choices' lists a choice twice"),
    ({"method": "awq"}, "mixed-precision: option 'method' must be one of gptq, rtn"),
])
def test_bad_options_name_the_pass(options, match):
    text = ",".join(f"{k}={v}" for k, v in options.items())
    with pytest.raises(PassConfigError, match=match):
        Pipeline.parse(f"mixed-precision{{{text}}}")


def test_text_form_round_trips_and_the_search_takes_the_budget_as_a_dimension():
    from optistack.search.space import parse_candidates

    p = MixedPrecisionPass(bits=4.25, choices="int4-g128+int4-g64+int8", method="rtn")
    assert Pipeline.parse(str(p)).passes == [p]
    variants = parse_candidates("mixed-precision{bits=4.25|4.5|5}")
    assert [v.config.bits for v in variants] == [4.25, 4.5, 5.0]


def test_export_and_the_engine_say_why_they_cannot_take_int8_layers(tmp_path, monkeypatch):
    """(`result.save` / `optistack.load_model` keep both layer types: examples/mixed_precision_smollm2.py.)"""
    from optistack.checkpoints import save_pretrained
    from optistack.checkpoints.compressed_tensors import CheckpointError
    from optistack.kernels.llama_engine import unsupported
    from optistack.passes.quant import head

    monkeypatch.setattr(head, "int8_kernel", lambda: "torch")
    model = MixedPrecisionPass(bits=5.5, method="rtn", **PROBE).apply(tiny_llama(), CTX).model
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    with pytest.raises(CheckpointError, match="is a Int8Linear"):  # compressed-tensors has no such layer
        save_pretrained(tmp_path / "hf", model)
    why = unsupported(model)
    assert why is not None and ("Int8Linear; the engine runs int4 projections" in why or "CPU" in why or "cpu" in why)
