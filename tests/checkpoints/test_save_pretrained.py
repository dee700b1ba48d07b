"""save_pretrained: each format loads back with transformers (+ compressed-tensors, on CPU) and gives
the logits of optistack's in-memory model."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import llama_folder  # noqa: E402

from optistack.checkpoints import save_pretrained  # noqa: E402
from optistack.checkpoints.compressed_tensors import CheckpointError, pack_bits, unpack_bits  # noqa: E402
from optistack.core.pass_protocol import PassContext  # noqa: E402
from optistack.core.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()


IDS = torch.randint(4, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def _apply(model, text: str, workload=None):
    return Pipeline.parse(text).passes[0].apply(copy.deepcopy(model), PassContext(workload=workload)).model


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits.float()


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("text,fmt,tol", [
    ("rtn-int4", "pack-quantized", 2e-3),  # ours runs bf16 activations on the int4 kernel; the reload fp32
    ("rtn-int4{zero_point=false}", "pack-quantized", 2e-3),
    ("int8-weight", "pack-quantized", 1e-5),
    ("int8-dynamic", "int-quantized", 2e-2),  # int8 activations rounded by torchao's kernel vs CT's fake-quant
    ("fp8", "float-quantized", 1e-6),
    ("fp8{mode=dynamic}", "float-quantized", 1e-6),
])
def test_quantized_formats_load_back_with_the_same_logits(model, tmp_path, text, fmt, tol):
    pytest.importorskip("compressed_tensors")
    ours = _apply(model, text)
    out = save_pretrained(tmp_path / "out", ours)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == fmt
    if text.startswith(("rtn", "fp8")):
        assert "lm_head" in q["ignore"]  # skipped by default: stays float
    assert (out / "tokenizer.json").is_file()  # the tokenizer travels with the weights
    reloaded = _reload(out)
    assert _rel(_logits(reloaded), _logits(ours)) < tol
    assert _rel(_logits(ours), _logits(model)) > 1e-4  # the format really is quantized, not a float copy


def test_int8_embedding_rows_are_written_as_the_float_table_they_stand_for(model, tmp_path):
    pytest.importorskip("compressed_tensors")
    ours = _apply(_apply(model, "rtn-int4"), "embed-int8")
    reloaded = _reload(save_pretrained(tmp_path / "out", ours))
    assert type(reloaded.model.embed_tokens).__name__ == "Embedding"
    assert torch.equal(reloaded.model.embed_tokens.weight, ours.model.embed_tokens.weight)
    assert _rel(_logits(reloaded), _logits(ours)) < 2e-3


def test_int4_checkpoint_is_smaller_and_stores_integer_zero_points(model, tmp_path):
    from safetensors import safe_open

    ours = _apply(model, "rtn-int4")
    out = save_pretrained(tmp_path / "q", ours)
    plain = save_pretrained(tmp_path / "f", model)
    assert (out / "model.safetensors").stat().st_size < 0.7 * (plain / "model.safetensors").stat().st_size
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        zp = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
    assert {"model.layers.0.mlp.down_proj.weight_scale", "model.layers.0.mlp.down_proj.weight_shape"} <= keys
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 // 8)
    assert zp.dtype == torch.int32 and zp.shape == (64 // 8, 128 // 64)
    layer = ours.model.layers[0].mlp.down_proj
    assert torch.equal(unpack_bits(packed, 128).to(torch.uint8), layer.codes()[:, :128])


def test_awq_model_from_a_folder_saves_and_reloads(folder, tmp_path):
    pytest.importorskip("compressed_tensors")
    from optistack.workloads import load

    w = load(str(folder))
    ours = _apply(w.model, "awq{calib_samples=4,n_grid=4}", workload=w)
    out = save_pretrained(tmp_path / "awq", ours)
    reloaded = _reload(out)
    assert _rel(_logits(reloaded), _logits(ours)) < 2e-3
    ppl_ours, ppl_back = w.evaluate(ours)["perplexity"], w.evaluate(reloaded)["perplexity"]
    assert abs(ppl_back / ppl_ours - 1) < 0.005


def test_pack_bits_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(3)
    for bits, cols in ((4, 72), (4, 64), (8, 36)):
        values = torch.randint(0, 1 << bits, (10, cols), generator=g)
        ours = pack_bits(values, bits)
        theirs = ct.pack_to_int32((values - (1 << (bits - 1))).to(torch.int8), bits)
        assert torch.equal(ours, theirs)
        assert torch.equal(unpack_bits(ours, cols, bits), values)


@pytest.mark.parametrize("text", ["prune-magnitude{sparsity=0.5}", "cast{dtype=bf16}", "identity"])
def test_float_results_are_plain_transformers_folders(model, tmp_path, text):
    ours = _apply(model, text)
    out = save_pretrained(tmp_path / "plain", ours, max_shard_size="100KB")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 100 KB
    reloaded = _reload(out).to(next(ours.parameters()).dtype)
    assert _rel(_logits(reloaded), _logits(ours)) < 1e-6


def test_ragged_int4_groups_are_written_dense_and_ignored(model, tmp_path):
    pytest.importorskip("compressed_tensors")
    ours = _apply(model, "rtn-int4{group_size=128}")  # in_features 64 < 128: one padded group per row
    out = save_pretrained(tmp_path / "r", ours)
    marker = json.loads((out / "optistack-checkpoint.json").read_text())
    assert marker["dense_fallback"] and not marker["quantized_layers"].get("pack-quantized")
    assert _rel(_logits(_reload(out)), _logits(ours)) < 2e-3


def test_what_transformers_cannot_load_is_refused_before_writing(model, tmp_path):
    pruned = _apply(model, "prune-structured{sparsity=0.5}")  # updates config.intermediate_size: loadable
    assert _rel(_logits(_reload(save_pretrained(tmp_path / "ok", pruned))), _logits(pruned)) < 1e-6
    pruned.config.intermediate_size = 128  # a config that no longer describes the weights
    with pytest.raises(CheckpointError, match="structured pruning changes shapes"):
        save_pretrained(tmp_path / "s", pruned)
    assert not (tmp_path / "s").exists()  # nothing half-written
    with pytest.raises(CheckpointError, match="result.save"):
        save_pretrained(tmp_path / "x", torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="zero_grid"):  # float zero points: not storable, said why
        save_pretrained(tmp_path / "f", _apply(model, "rtn-int4{zero_grid=float}"))
    assert not (tmp_path / "f").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not written by optistack"):
        save_pretrained(tmp_path / "mine", model)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_saving_twice_replaces_our_own_folder_and_leaves_the_model_unchanged(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(tmp_path / "o", model)
    save_pretrained(tmp_path / "o", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
