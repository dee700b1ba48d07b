"""`prune-magnitude`: unstructured zeros in Linear weights, exact sparsity, no masks left behind."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama
from tiny_models import tiny_mlp as _tiny_mlp
from torch import nn

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.passes.prune.magnitude import MagnitudePrunePass

CTX = PassContext()


def tiny_mlp():
    return _tiny_mlp(32, 128, 16, activation=nn.ReLU)


def zero_fraction(w):
    return float((w == 0).float().mean())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_layer_scope_hits_target_in_every_layer(sparsity):
    model = tiny_mlp()
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    result = MagnitudePrunePass(sparsity=sparsity).apply(model, CTX)
    assert result.modified and result.info["linears_pruned"] == 2
    assert abs(result.info["sparsity"] - sparsity) < 0.01
    for m, w0 in zip((model[0], model[2]), before):
        assert abs(zero_fraction(m.weight) - sparsity) < 0.01
        kept = m.weight != 0  # survivors are the largest magnitudes, unchanged
        assert w0.abs()[kept].min() >= w0.abs()[~kept].max()
        assert torch.equal(m.weight[kept], w0[kept])
    assert model[0].bias.ne(0).all()  # biases are not pruned


def test_global_scope_hits_target_overall_and_skips_lm_head():
    model = tiny_llama()
    ids = torch.randint(0, 100, (1, 8))
    result = MagnitudePrunePass(sparsity=0.5, scope="global").apply(model, CTX)
    layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    assert abs(zeros / total - 0.5) < 0.01 and abs(result.info["sparsity"] - 0.5) < 0.01
    assert result.info["linears_pruned"] == 14
    assert zero_fraction(model.lm_head.weight) == 0.0 and zero_fraction(model.model.embed_tokens.weight) == 0.0
    assert model(ids).logits.shape == (1, 8, 100)


def test_pruning_is_permanent_plain_tensors():
    model = tiny_llama()
    MagnitudePrunePass().apply(model, CTX)
    for name, m in model.named_modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, name
        assert not hasattr(m, "parametrizations") and not any(n.endswith("_mask") for n, _ in m.named_buffers())
    for p in model.parameters():
        assert type(p) is nn.Parameter and type(p.data) is torch.Tensor
    copied = copy.deepcopy(model)
    assert zero_fraction(copied.model.layers[0].mlp.up_proj.weight) == pytest.approx(0.5, abs=0.01)


def test_nothing_eligible_is_nothing_to_change():
    result = MagnitudePrunePass().apply(nn.Sequential(nn.Conv1d(2, 2, 1)), CTX)
    assert not result.modified and result.info["reason"].startswith("nothing to change: no nn.Linear")
    result = MagnitudePrunePass(skip=".*").apply(tiny_mlp(), CTX)
    assert not result.modified and "skip='.*'" in result.info["reason"]
    with pytest.raises(PassApplyError, match="^prune-magnitude: expected a torch.nn.Module"):
        MagnitudePrunePass().apply(object(), CTX)


@pytest.mark.parametrize("bad", [1.5, 0, 1.0, -0.1])
def test_bad_sparsity_names_pass_and_option(bad):
    with pytest.raises(PassConfigError, match=r"^prune-magnitude: option 'sparsity' must be between 0 and 1"):
        MagnitudePrunePass(sparsity=bad)


def test_bad_scope_and_skip():
    with pytest.raises(PassConfigError, match=r"^prune-magnitude: option 'scope' must be one of layer, global"):
        MagnitudePrunePass(scope="model")
    with pytest.raises(PassConfigError, match=r"^prune-magnitude: option 'skip'"):
        MagnitudePrunePass(skip="[")


def test_text_round_trips():
    assert str(MagnitudePrunePass(sparsity=0.3)) == "prune-magnitude{sparsity=0.3}"
    p = MagnitudePrunePass(sparsity=0.7, scope="global", skip="")
    [(name, opts)] = parse_pipeline_text(str(p))
    assert name == "prune-magnitude" and MagnitudePrunePass(**opts) == p
