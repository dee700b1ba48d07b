"""`awq{quantize=false},gptq`: GPTQ keeps a block's AWQ scales only where the block, rounded on its real inputs,
is closer to the float one with them than without, judged on held-out sequences (awq_check.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_awq import CTX, FAST, held_out_ids, logits, tiny_llama

from optistack.core.pipeline import Pipeline
from optistack.passes.quant.awq_check import FOLDS_ATTR, AwqFold, Originals, keep_scales, restore, split_sequences, undo
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


def awq_like_folds(block):
    """Folds AWQ-like factors (0.25 to 4.25) into `block` as awq does (norm -> q/k/v, norm -> gate/up, up -> down);
    returns the record with the tensors before (`Originals`) and a copy of the block as it was."""
    as_was = copy.deepcopy(block)
    g = torch.Generator().manual_seed(1)
    folds = []
    for prev, lins in (("input_layernorm", QKV), ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                       ("mlp.up_proj", ["mlp.down_proj"])):
        width = block.get_submodule(lins[0]).weight.shape[1]
        s = torch.rand(width, generator=g) * 4 + 0.25
        fold_scale(block.get_submodule(prev), [block.get_submodule(n) for n in lins], s)
        folds.append(AwqFold("model.layers.0", prev, lins, s, None, Originals.of(as_was, [prev, *lins])))
    return folds, as_was


@torch.no_grad()
def test_undo_from_the_record_gives_the_weights_before_awq_back_bit_for_bit():
    """Folding 1 / s back lands an ulp away; the record of the tensors before AWQ gives them back exactly, as fresh
    tensors (the model before the pass keeps its own)."""
    block = tiny_llama().model.layers[0]
    folds, as_was = awq_like_folds(block)
    arithmetic = copy.deepcopy(block)
    undo(arithmetic, [AwqFold(f.block, f.prev, f.linears, f.s) for f in folds])
    assert not all(torch.equal(p, q) for p, q in zip(arithmetic.parameters(), as_was.parameters()))
    assert restore(block, folds) is True
    for (n, p), q in zip(block.named_parameters(), as_was.parameters()):
        assert torch.equal(p, q), n
        assert p.data_ptr() != q.data_ptr(), n
    assert copy.deepcopy(folds)[0].originals is folds[0].originals  # a model's copy does not copy the body


@torch.no_grad()
def test_a_block_edited_after_awq_is_undone_by_folding_back():
    """Where the block's tensors are no longer what the folds made of the record (another pass edited them),
    the record is not used: undo folds 1 / s back into what is there."""
    block = tiny_llama().model.layers[0]
    folds, as_was = awq_like_folds(block)
    block.self_attn.q_proj.weight[0, 0] += 1.0
    edited = block.self_attn.q_proj.weight.clone()
    assert restore(copy.deepcopy(block), folds) is False
    undo(block, folds)
    s = folds[0].s
    assert torch.allclose(block.self_attn.q_proj.weight, edited / s, rtol=1e-5)
    assert torch.allclose(block.mlp.down_proj.weight, as_was.mlp.down_proj.weight, rtol=1e-5, atol=1e-7)


def test_awq_then_gptq_with_the_scales_undone_is_gptq_alone_bit_for_bit():
    """`awq,gptq` no worse than the better of the two: where the check undoes the scales (a margin no body clears),
    the result is `gptq`'s on the same model, every tensor equal."""
    model = tiny_llama()
    opts = ",".join(f"{k}={v}" for k, v in FAST.items() if k != "search_samples")
    out, info = copy.deepcopy(model), {}
    for p in Pipeline.parse(f"awq{{quantize=false,n_grid=4,search_samples=4,{opts}}},"
                            f"gptq{{awq_check_z=100,{opts}}}").passes:
        result = p.apply(out, CTX)
        out, info = result.model, result.info
    assert info["awq_scales_kept"] is False
    (g,) = Pipeline.parse(f"gptq{{{opts}}}").passes
    ref = g.apply(copy.deepcopy(model), CTX).model.state_dict()
    got = out.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


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
