"""`awq{quantize=false},gptq`: GPTQ keeps a block's AWQ scales only where the block, rounded on its real inputs,
is closer to the float one with them than without, judged on held-out sequences (awq_check.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_awq import CTX, FAST, held_out_ids, logits, tiny_llama

from optistack.core.pipeline import Pipeline
from optistack.passes.quant.awq_check import FOLDS_ATTR, AwqFold, keep_scales, split_sequences, undo
from optistack.passes.quant.awq_search import fold_scale
from optistack.passes.quant.gptq import GptqConfig

QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def block_inputs(model, ids):
    """The (args, kwargs) the first decoder block is called with on `ids`."""
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    return seen


def grid(step):
    return lambda w, h: torch.round(w / step) * step


@torch.no_grad()
def test_undo_gives_the_unscaled_weights_back_and_the_function_never_changes():
    model = tiny_llama()
    block = model.model.layers[0]
    before = {n: p.clone() for n, p in block.named_parameters()}
    inputs = block_inputs(model, held_out_ids())
    out = block(*inputs[0][0], **inputs[0][1])[0]
    s = torch.rand(block.input_layernorm.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 4 + 0.25
    fold_scale(block.input_layernorm, [block.get_submodule(n) for n in QKV], s)
    assert not torch.allclose(block.self_attn.q_proj.weight, before["self_attn.q_proj.weight"])
    assert torch.allclose(block(*inputs[0][0], **inputs[0][1])[0], out, atol=1e-5)
    undo(block, [AwqFold("model.layers.0", "input_layernorm", QKV, s)])
    for n, p in block.named_parameters():
        assert torch.allclose(p, before[n], rtol=1e-5, atol=1e-7), n


@torch.no_grad()
def test_a_blocks_scales_are_kept_where_they_help_and_undone_where_they_hurt():
    """A rounding onto a fixed grid of step 0.01: scaling q/k/v's inputs by 100 puts the weights on a grid 100x
    finer (kept); by 0.01 rounds them all to zero (undone, the block back to its unscaled weights)."""
    model = tiny_llama()
    inputs = block_inputs(model, held_out_ids(n=4))
    for s_value, kept in ((100.0, True), (0.01, False)):
        block = copy.deepcopy(model.model.layers[0])
        unscaled = block.self_attn.q_proj.weight.clone()
        s = torch.full((block.input_layernorm.weight.shape[0],), s_value)
        fold_scale(block.input_layernorm, [block.get_submodule(n) for n in QKV], s)
        fold = AwqFold("model.layers.0", "input_layernorm", QKV, s)
        assert keep_scales(block, [fold], QKV, inputs, grid(0.01)) is kept
        weight = block.self_attn.q_proj.weight
        assert torch.allclose(weight, unscaled * s_value, rtol=1e-5) if kept else torch.allclose(weight, unscaled, rtol=1e-5)


@torch.no_grad()
def test_a_margin_undoes_scales_that_help_by_less_than_it():
    """awq_check_z: scales that help (the 100x finer grid) are kept at 2 standard errors and undone at 100,
    a margin the held-out sequences' differing gains do not clear."""
    model = tiny_llama()
    inputs = block_inputs(model, held_out_ids(n=4))
    block = copy.deepcopy(model.model.layers[0])
    unscaled = block.self_attn.q_proj.weight.clone()
    s = torch.full((block.input_layernorm.weight.shape[0],), 100.0)
    fold_scale(block.input_layernorm, [block.get_submodule(n) for n in QKV], s)
    fold = AwqFold("model.layers.0", "input_layernorm", QKV, s)
    assert keep_scales(copy.deepcopy(block), [fold], QKV, inputs, grid(0.01), z=2.0) is True
    assert keep_scales(block, [fold], QKV, inputs, grid(0.01), z=100.0) is False
    assert torch.allclose(block.self_attn.q_proj.weight, unscaled, rtol=1e-5)


def test_awq_check_z_is_validated():
    with pytest.raises(ValueError, match="awq_check_z"):
        GptqConfig(awq_check_z=-1.0)


def test_sequences_split_in_halves_per_batch():
    x = torch.randn(5, 3, 8)
    fit, judge = split_sequences([((x,), {}), ((x[:1],), {})])
    assert [f[0][0].shape[0] for f in fit] == [3, 1] and [j[0][0].shape[0] for j in judge] == [2]
    assert keep_scales(torch.nn.Identity(), [], [], [((x[:1],), {})], grid(0.1)) is None  # nothing held out


def test_awq_then_gptq_reports_the_blocks_it_kept_and_consumes_the_record():
    """awq_check=true (block) reports every block's choice; off reports none; both use the record up."""
    model = tiny_llama()
    opts = ",".join(f"{k}={v}" for k, v in FAST.items() if k != "search_samples")
    out = copy.deepcopy(model)
    infos = []
    for p in Pipeline.parse(f"awq{{quantize=false,n_grid=4,search_samples=4,{opts}}},gptq{{awq_check=true,{opts}}}").passes:
        assert not hasattr(out, FOLDS_ATTR) or p.name == "gptq"
        result = p.apply(out, CTX)
        out, infos = result.model, infos + [result.info]
    assert infos[-1]["awq_blocks_kept"] + infos[-1]["awq_blocks_undone"] == len(model.model.layers)
    assert not hasattr(out, FOLDS_ATTR)
    ref = logits(model, held_out_ids())
    assert float((logits(out, held_out_ids()) - ref).pow(2).mean()) < 0.05 * float(ref.pow(2).mean())
    off = copy.deepcopy(model)
    for p in Pipeline.parse(f"awq{{quantize=false,n_grid=4,search_samples=4,{opts}}},gptq{{awq_check=off,{opts}}}").passes:
        result = p.apply(off, CTX)
        off = result.model
    assert not any(k.startswith("awq_") for k in result.info) and not hasattr(off, FOLDS_ATTR)
