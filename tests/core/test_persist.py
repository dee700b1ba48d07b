"""Save and load: bit-identical outputs, no pickle, clear refusals."""
import json

import pytest
import torch
from tiny_models import tiny_llama as _tiny_llama

import optistack as ost
from optistack.bench.timer import TimingConfig
from optistack.core.errors import OptistackError
from optistack.workloads.generic import GenericWorkload

FAST = TimingConfig(warmup=1, min_rounds=3, max_rounds=3)


def tiny_llama():
    return _tiny_llama(vocab_size=128, tie_word_embeddings=True)


def run(model, pipeline):
    ids = torch.randint(0, 128, (1, 16))
    wl = GenericWorkload(model, ((), {"input_ids": ids}))
    return ost.Pipeline.parse(pipeline).run(wl, timing=FAST, verbose=False), ids


@pytest.mark.parametrize("pipeline", [
    "prune-magnitude{sparsity=0.5}",
    "prune-structured{sparsity=0.5},cast{dtype=bf16}",
    "cast{dtype=fp16},compile{backend=eager}",
    "prune-wanda{sparsity=0.5},fp8",
    "fp8{mode=dynamic}",
    "rtn-int4{group_size=32}",
    "awq{group_size=32,calib_samples=2,calib_seq_len=16,n_grid=4}",
])
def test_saved_and_loaded_model_gives_bit_identical_logits(tmp_path, pipeline):
    result, ids = run(tiny_llama(), pipeline)
    assert all(s.status == "applied" for s in result.report.steps), [s.reason for s in result.report.steps]
    result.save(tmp_path)
    manifest = json.loads((tmp_path / "optistack.json").read_text())
    assert manifest["pipeline"] == str(ost.Pipeline.parse(pipeline))
    loaded = ost.load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())


def test_shrunk_linears_are_rebuilt_from_the_manifest(tmp_path):
    result, _ = run(tiny_llama(), "prune-structured{sparsity=0.5}")
    result.save(tmp_path)
    replaced = json.loads((tmp_path / "optistack.json").read_text())["replaced"]
    assert replaced["model.layers.0.mlp.up_proj"]["spec"]["out_features"] == 64


def test_a_user_module_needs_a_fresh_instance_to_load_into(tmp_path):
    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))

    result = ost.optimize(make(), torch.randn(4, 8), "prune-magnitude{sparsity=0.5}", timing=FAST, verbose=False)
    result.save(tmp_path)
    with pytest.raises(OptistackError, match="pass a freshly built instance"):
        ost.load_model(tmp_path)
    loaded = ost.load_model(tmp_path, model=make())
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), result.model(x))


def test_tensor_subclass_weights_are_refused_with_the_reason(tmp_path):
    result, _ = run(tiny_llama(), "int8-weight")
    with pytest.raises(OptistackError, match="tensor subclass"):
        result.save(tmp_path)


def test_not_a_saved_model_is_a_clear_error(tmp_path):
    with pytest.raises(OptistackError, match="not a model saved by optistack"):
        ost.load_model(tmp_path)


def test_load_model_is_the_name_and_load_a_deprecated_alias_that_warns(tmp_path):
    import optistack.checkpoints.loadables

    assert ost.load_model is optistack.checkpoints.loadables.load_model and "load" not in dir(ost) and "load_model" in dir(ost)
    removal = r"optistack\.load is deprecated and will be removed in optistack 0\.2\.0: "
    with pytest.warns(DeprecationWarning, match=removal + r"use optistack\.load_model .*workload"):
        old = ost.load
    assert old is ost.load_model
    with pytest.warns(DeprecationWarning):  # every use warns, not only the first
        with pytest.raises(OptistackError):
            ost.load(tmp_path)
