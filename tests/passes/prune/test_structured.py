"""`prune-structured`: whole neurons/heads removed, so Linear layers shrink and the model still runs."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama
from torch import nn

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.passes.prune.structured import StructuredPrunePass

CTX = PassContext()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_bert_mlp_neurons_shrink_and_config_follows():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    before = n_params(model)
    result = StructuredPrunePass(sparsity=0.25).apply(model, CTX)
    for layer in model.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (96, 64) and layer.intermediate.dense.bias.shape == (96,)
        assert layer.output.dense.weight.shape == (64, 96) and layer.output.dense.in_features == 96
    assert model.config.intermediate_size == 96
    assert result.info["neurons_removed"] == 64 and result.info["heads_removed"] == 0
    assert result.info["params_before"] == before and result.info["params_after"] == n_params(model) < before
    assert result.info["config_reloadable"] is True
    assert model(ids).last_hidden_state.shape == (2, 8, 64)


def test_bert_heads_shrink_attention_and_output_stays_close_at_low_sparsity():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    result = StructuredPrunePass(sparsity=0.0, heads=0.25).apply(model, CTX)
    attn = model.encoder.layer[0].attention
    assert attn.self.num_attention_heads == 3 and attn.self.all_head_size == 48
    assert attn.self.query.weight.shape == attn.self.key.weight.shape == attn.self.value.weight.shape == (48, 64)
    assert attn.output.dense.weight.shape == (64, 48)
    assert result.info["heads_removed"] == 2 and result.info["heads_before"] == 8
    assert result.info["config_reloadable"] is False  # BertConfig cannot describe 3 heads of 16
    assert model.config.num_attention_heads == 4
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_removes_least_important_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 0.01, 1.0, 0.02])[:, None])  # neurons 1 and 3 are weak
    kept = model[0].weight[[0, 2]].clone()
    StructuredPrunePass(sparsity=0.5).apply(model, CTX)
    assert torch.equal(model[0].weight, kept)


def test_llama_mlp_shrinks_and_reloads(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    ids = torch.randint(0, 100, (1, 8))
    result = StructuredPrunePass(sparsity=0.5, importance="l1").apply(model, CTX)
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (64, 64)
    assert mlp.down_proj.weight.shape == (64, 64)
    assert model.config.intermediate_size == 64 and result.info["neurons_removed"] == 128
    logits = model(ids).logits
    assert logits.shape == (1, 8, 100)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, logits)


def test_llama_heads_are_refused_with_reason():
    with pytest.raises(PassApplyError, match="^prune-structured: heads=0.5 .*BERT-style attention"):
        StructuredPrunePass(heads=0.5).apply(tiny_llama(), CTX)


def test_sequential_chain_keeps_at_least_one_neuron():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 4), nn.GELU(), nn.Linear(4, 3))
    x = torch.randn(5, 8)
    result = StructuredPrunePass(sparsity=0.9).apply(model, CTX)
    assert model[0].out_features == model[3].in_features == 3
    assert model[3].out_features == model[5].in_features == 1  # 4 * 0.9 rounds to 4, one is kept
    assert result.info["mlps"] == 2 and "config_reloadable" not in result.info
    assert model(x).shape == (5, 3)


def test_zero_fractions_change_nothing():
    model = tiny_bert()
    result = StructuredPrunePass(sparsity=0.0).apply(model, CTX)
    assert not result.modified and model.encoder.layer[0].intermediate.dense.out_features == 128
    assert result.info["reason"].startswith("nothing to change: sparsity=0.0 and heads=0.0 remove no neuron")


def test_unrecognized_model_is_nothing_to_change():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    result = StructuredPrunePass().apply(model, CTX)
    assert not result.modified and result.info["reason"].startswith("nothing to change: found no prunable structure")


@pytest.mark.parametrize("opts, option", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                          ({"heads": 1}, "heads"), ({"importance": "l3"}, "importance")])
def test_bad_options_name_pass_and_option(opts, option):
    with pytest.raises(PassConfigError, match=rf"^prune-structured: option '{option}'"):
        StructuredPrunePass(**opts)


def test_text_round_trips():
    assert str(StructuredPrunePass(heads=0.25)) == "prune-structured{heads=0.25}"
    p = StructuredPrunePass(sparsity=0.5, heads=0.25, importance="l1")
    [(name, opts)] = parse_pipeline_text(str(p))
    assert name == "prune-structured" and StructuredPrunePass(**opts) == p


def _zero_neurons(model, arch):
    """Zero the first-projection rows (and biases) of neurons 0..7 in every MLP: each then outputs 0
    (gelu(0) = relu(0) = silu(0) * up = 0), so removing exactly them leaves the function unchanged."""
    from optistack.passes.linears import weight_rows

    first = {"gpt2": "c_fc", "phi3": "gate_up_proj", "gpt-neox": "dense_h_to_4h", "t5": "wi"}[arch]
    dead = torch.arange(8)  # for Phi-3's fused [gate; up] rows: the gate rows
    with torch.no_grad():
        for m in model.modules():
            lin = getattr(m, first, None)
            if lin is not None:
                weight_rows(lin)[dead] = 0.0
                if lin.bias is not None:
                    lin.bias[dead] = 0.0


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gpt-neox", "t5"])
def test_mlps_of_other_architectures_lose_exactly_the_least_important_neurons(arch):
    from tiny_models import ARCHITECTURES

    build, inputs = ARCHITECTURES[arch]
    model, x = build(), inputs()[0]
    _zero_neurons(model, arch)
    with torch.no_grad():
        ref = flat(model(**x))
    result = StructuredPrunePass(sparsity=8 / 128).apply(model, CTX)
    assert result.modified and result.info["neurons_removed"] == 8 * result.info["mlps"] > 0
    key = {"gpt2": "n_inner", "phi3": "intermediate_size", "gpt-neox": "intermediate_size", "t5": "d_ff"}[arch]
    assert result.info[key] == 120 and getattr(model.config, key) == 120
    with torch.no_grad():
        assert torch.allclose(flat(model(**x)), ref, atol=1e-5)


def flat(out):
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
