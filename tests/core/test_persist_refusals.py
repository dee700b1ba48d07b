"""Named attacks on a saved folder, each refused with one LoadError that says what and where, and
nothing written: ONNX Runtime's `optimized_model_path`, class names that point at real but not
allowed attributes, path traversal and links, external data outside the folder, old folders."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_persist_tampering import IDS, no_side_effects, onnx_graph, refresh_checksums
from tiny_models import tiny_llama

from optistack.bench.report import Step
from optistack.checkpoints.loadables import load_model
from optistack.core.errors import LoadError, OptistackError
from optistack.core.pass_protocol import PassContext
from optistack.core.persist import save_model
from optistack.passes.quant.rtn import RtnInt4Pass


def step(p, info=None):
    return Step(pass_name=p.name, config=p.config.to_dict(), text=str(p), info=info or {}, status="applied")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = tiny_llama(vocab_size=128, tie_word_embeddings=True)
    p = RtnInt4Pass(group_size=32)
    result = p.apply(copy.deepcopy(model), PassContext())
    folder = tmp_path_factory.mktemp("llama") / "saved"
    save_model(folder, result.model, model, [step(p, result.info)], {})
    return folder


@pytest.fixture(scope="module")
def ort_folder(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from optistack.passes.export.session import OrtModel

    src = tmp_path_factory.mktemp("onnx-src")
    onnx_graph(src / "graph.onnx", external=True)
    folder = tmp_path_factory.mktemp("ort") / "saved"
    save_model(folder, OrtModel(str(src / "graph.onnx"), intra_op_threads=1, provider="cpu"), None, [], {})
    return folder


def tampered(folder: Path, tmp_path: Path, edit, deliberate: bool = True) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target, symlinks=True)
    manifest = json.loads((target / "optistack.json").read_text())
    edit(manifest, target)
    (target / "optistack.json").write_text(json.dumps(manifest))
    if deliberate:
        refresh_checksums(target)
    return target


def refused(folder: Path, tmp_path: Path, *fragments: str, model=None) -> str:
    with no_side_effects(tmp_path), pytest.raises(LoadError) as info:
        load_model(folder, model=model)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, OptistackError)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_saved_onnx_model_lists_and_checks_its_external_data(ort_folder):
    import numpy as np

    manifest = json.loads((ort_folder / "optistack.json").read_text())
    assert sorted(manifest["integrity"]["files"]) == ["graph.data", "graph.onnx"]
    loaded = load_model(ort_folder)
    x = np.ones((2, 8), dtype=np.float32)
    assert loaded.intra_op_threads == 1 and loaded(x).shape == (2, 4)


def test_ort_optimized_model_path_is_refused_by_name_and_nothing_is_written(ort_folder, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for path in (victim, tmp_path / "new.onnx"):
        folder = tampered(ort_folder, tmp_path / path.stem, lambda m, d: m["runtime"]["options"].__setitem__(
            "optimized_model_path", str(path)))
        refused(folder, tmp_path, "runtime.options", "optimized_model_path")
    assert victim.read_text() == "precious" and not (tmp_path / "new.onnx").exists()


def test_ort_load_from_itself_refuses_an_option_it_does_not_write(ort_folder, tmp_path):
    from optistack.passes.export.session import OrtModel

    with pytest.raises(ValueError, match="optimized_model_path"):
        OrtModel.load_from(str(ort_folder), "graph.onnx", {"optimized_model_path": str(tmp_path / "x.onnx")})
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("value,fragment", [(-1, "intra_op_threads"), ("1", "intra_op_threads"), (True, "intra_op_threads")])
def test_ort_option_values_are_type_checked(ort_folder, tmp_path, value, fragment):
    folder = tampered(ort_folder, tmp_path, lambda m, d: m["runtime"]["options"].__setitem__("intra_op_threads", value))
    refused(folder, tmp_path, fragment)


def test_onnx_external_data_outside_the_folder_is_refused(ort_folder, tmp_path):
    import onnx

    def point_outside(manifest, folder):
        proto = onnx.load(str(folder / "graph.onnx"), load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = "../graph.data"
        onnx.save_model(proto, str(folder / "graph.onnx"))
        shutil.copy(folder / "graph.data", folder.parent / "graph.data")

    refused(tampered(ort_folder, tmp_path, point_outside), tmp_path, "graph.onnx", "external data", "'..'")


def test_onnx_session_options_inside_the_graph_are_refused(ort_folder, tmp_path):
    import onnx

    def add_ort_config(manifest, folder):
        proto = onnx.load(str(folder / "graph.onnx"), load_external_data=False)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "ort_config", json.dumps({"session_options": {"optimized_model_filepath": "x.onnx"}})
        onnx.save_model(proto, str(folder / "graph.onnx"))

    refused(tampered(ort_folder, tmp_path, add_ort_config), tmp_path, "graph.onnx", "ort_config")


def test_an_openvino_model_saves_and_loads_and_its_weights_file_is_checked(tmp_path):
    ov = pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    import numpy as np

    from optistack.passes.export.openvino import OvModel

    onnx_graph(tmp_path / "graph.onnx", external=False)
    model = OvModel(ov.Core().read_model(str(tmp_path / "graph.onnx")), threads=1)
    save_model(tmp_path / "saved", model, None, [], {})
    assert sorted(json.loads((tmp_path / "saved" / "optistack.json").read_text())["integrity"]["files"]) == [
        "model.bin", "model.xml"]
    x = np.ones((2, 8), dtype=np.float32)
    assert torch.equal(load_model(tmp_path / "saved")(x), model(x))

    def unlisted_bin(manifest, folder):
        del manifest["integrity"]["files"]["model.bin"]

    refused(tampered(tmp_path / "saved", tmp_path / "t", unlisted_bin), tmp_path / "t", "model.xml", "model.bin",
            "not one of the checksummed files")
    folder = tampered(tmp_path / "saved", tmp_path / "u", lambda m, d: m["runtime"]["options"].__setitem__(
        "cache_dir", str(tmp_path / "cache")))
    refused(folder, tmp_path / "u", "runtime.options", "cache_dir")


CLASS_NAMES = ["optistack.core.persist:save_model", "os:system", "transformers:pipeline", "transformers.pipeline",
               "builtins:eval", "torch.nn:Linear", "optistack.passes.quant.int4:Int4Linear.from_linear",
               "optistack.passes.export.session:choose_providers", "optistack.passes.quant.int4:Int4Linear "]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_a_real_but_not_allowed_replacement_class_is_refused(llama_folder, tmp_path, name):
    def edit(manifest, _):
        manifest["replaced"]["model.layers.0.mlp.down_proj"]["class"] = name

    refused(tampered(llama_folder, tmp_path, edit), tmp_path, "replaced['model.layers.0.mlp.down_proj'].class",
            "is not a class optistack loads")


@pytest.mark.parametrize("name", CLASS_NAMES + ["optistack.passes.quant.int4:Int4Linear",
                                                "optistack.passes.quant.int4_linear:Int4Linear"])
def test_a_real_but_not_allowed_runtime_class_is_refused(ort_folder, tmp_path, name):
    folder = tampered(ort_folder, tmp_path, lambda m, d: m["runtime"].__setitem__("class", name))
    refused(folder, tmp_path, "runtime.class", "is not a class optistack loads")


@pytest.mark.parametrize("name", ["pipeline", "AutoModel", "AutoModelForCausalLM", "PreTrainedModel", "__class__",
                                  "LlamaForCausalLM.from_pretrained", "os", "LlamaConfig", "logging"])
def test_a_base_class_outside_transformers_model_mappings_is_refused(llama_folder, tmp_path, name):
    folder = tampered(llama_folder, tmp_path, lambda m, d: m["base"].__setitem__("class", name))
    refused(folder, tmp_path, "base.class", "is not a transformers model class")


@pytest.mark.parametrize("key,value", [("attn_implementation", "kernels-community/flash-attn"),
                                       ("_attn_implementation", "flash_attention_2"),
                                       ("experts_implementation", "grouped_mm"), ("__class__", "x"),
                                       ("num_labels", 10**9), ("use_return_dict", False)])
def test_config_keys_that_choose_code_are_refused(llama_folder, tmp_path, key, value):
    folder = tampered(llama_folder, tmp_path, lambda m, d: m["base"]["config"].__setitem__(key, value))
    refused(folder, tmp_path, "base.config", key)


def test_extra_plain_config_values_still_load(llama_folder, tmp_path):
    """Converted checkpoints carry keys their config class does not define (SmolLM2's GGUF conversion
    writes `_model_name_or_path`): plain values, so they load."""
    folder = tampered(llama_folder, tmp_path, lambda m, d: m["base"]["config"].update(
        {"_model_name_or_path": "x", "custom_note": [1, 2]}))
    with no_side_effects(tmp_path):
        model = load_model(folder)
    assert model.config._model_name_or_path == "x"


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "a/../../x", "sub\\x", "C:x", "./model.safetensors"])
def test_file_names_that_leave_the_folder_are_refused(llama_folder, tmp_path, name):
    def edit(manifest, folder):
        files = manifest["integrity"]["files"]
        files[name] = dict(files["model.safetensors"])

    refused(tampered(llama_folder, tmp_path, edit), tmp_path, "file name")


def test_a_link_pointing_outside_the_folder_is_refused_even_with_the_right_hash(llama_folder, tmp_path):
    def edit(manifest, folder):
        outside = folder.parent / "outside.safetensors"
        shutil.move(folder / "model.safetensors", outside)
        os.symlink(outside, folder / "model.safetensors")

    refused(tampered(llama_folder, tmp_path, edit), tmp_path, "model.safetensors", "link pointing outside")


def test_a_missing_file_and_an_unlisted_reference_are_refused(llama_folder, ort_folder, tmp_path):
    gone = tampered(llama_folder, tmp_path / "a", lambda m, d: (d / "model.safetensors").unlink())
    refused(gone, tmp_path, "model.safetensors", "missing")

    def unlisted(manifest, folder):
        manifest["runtime"]["file"] = "other.onnx"
        shutil.copy(folder / "graph.onnx", folder / "other.onnx")

    refused(tampered(ort_folder, tmp_path / "b", unlisted), tmp_path, "runtime.file", "not one of the checksummed files")


def test_a_path_that_is_not_a_saved_folder_is_one_load_error(llama_folder, tmp_path):
    refused(tmp_path / "nowhere", tmp_path, "does not exist")
    refused(llama_folder / "optistack.json", tmp_path, "is not a folder")
    refused(tmp_path, tmp_path, "not a model saved by optistack")
    (tmp_path / "linked").mkdir()
    os.symlink(llama_folder / "optistack.json", tmp_path / "linked" / "optistack.json")
    refused(tmp_path / "linked", tmp_path, "optistack.json", "not a link")


def test_old_folders_without_checksums_are_refused_with_re_save_advice(llama_folder, tmp_path):
    def old(manifest, _):
        manifest["format"] = "optistack.model/1"
        del manifest["integrity"]

    refused(tampered(llama_folder, tmp_path, old, deliberate=False), tmp_path, "without checksums", "save it again")


@pytest.mark.parametrize("text,fragment", [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                           ('{"a": 1, "a": 2}', "duplicate key"), ("\xff", "not valid JSON"),
                                           ("[" * 100000, "not valid JSON")])
def test_a_manifest_that_is_not_a_json_object_is_one_load_error(llama_folder, tmp_path, text, fragment):
    target = tmp_path / "copy"
    shutil.copytree(llama_folder, target)
    (target / "optistack.json").write_text(text)
    refused(target, tmp_path, "optistack.json", fragment)


def test_weight_file_damage_is_named(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    def flip(manifest, folder):
        raw = bytearray((folder / "model.safetensors").read_bytes())
        raw[-5] ^= 0x40
        (folder / "model.safetensors").write_bytes(bytes(raw))

    refused(tampered(llama_folder, tmp_path / "flip", flip, deliberate=False), tmp_path, "model.safetensors",
            "checksum mismatch")

    def truncate(manifest, folder):
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:6])

    refused(tampered(llama_folder, tmp_path / "trunc", truncate), tmp_path, "truncated safetensors header")

    def reshape(manifest, folder):
        state = load_file(str(folder / "model.safetensors"))
        state["model.norm.weight"] = torch.ones(32)
        save_file(state, str(folder / "model.safetensors"))

    refused(tampered(llama_folder, tmp_path / "shape", reshape), tmp_path, "'model.norm.weight' has shape [32]")

    def drop(manifest, folder):
        state = load_file(str(folder / "model.safetensors"))
        del state["model.norm.weight"]
        save_file(state, str(folder / "model.safetensors"))

    refused(tampered(llama_folder, tmp_path / "drop", drop), tmp_path, "missing tensor 'model.norm.weight'")


def test_steps_rerun_on_load_take_only_safe_values(llama_folder, tmp_path):
    cases = [({"pass": "compile", "config": {"backend": "tvm"}}, "steps[1].config.backend"),
             ({"pass": "speculative", "config": {"method": "draft", "draft": "/somewhere"}}, "draft model path"),
             ({"pass": "attention", "config": {"impl": "flash_attention_2"}}, "steps[1].config.impl"),
             ({"pass": "no-such-pass", "config": {}}, "unknown pass"),
             ({"pass": "cast", "config": {"dtype": "bf16", "optimized_model_path": "/tmp/x"}}, "optimized_model_path")]
    for i, (entry, fragment) in enumerate(cases):
        folder = tampered(llama_folder, tmp_path / str(i), lambda m, d: m["steps"].append(entry))
        refused(folder, tmp_path, fragment)


def test_a_third_party_pass_is_never_rerun_from_a_folder(llama_folder, tmp_path):
    from optistack.core.pass_protocol import ConfiguredPass, PassResult
    from optistack.core.registry import register_pass, unregister_pass

    ran = []

    class Hooky(ConfiguredPass):
        name = "test-hooky"
        reapply_on_load = True

        def apply(self, model, ctx):
            ran.append(model)
            return PassResult(model, modified=True)

    register_pass(Hooky)
    try:
        folder = tampered(llama_folder, tmp_path, lambda m, d: m["steps"].append({"pass": "test-hooky", "config": {}}))
        refused(folder, tmp_path, "steps[1]", "test-hooky", "re-run from a saved folder")
    finally:
        unregister_pass("test-hooky")
    assert ran == []


def test_a_user_model_is_left_untouched_when_its_folder_is_refused(tmp_path):
    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

    pruned = make()
    pruned[0] = torch.nn.Linear(8, 12)
    pruned[2] = torch.nn.Linear(12, 8)
    save_model(tmp_path / "saved", pruned, make(), [], {})
    fresh = make()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    folder = tampered(tmp_path / "saved", tmp_path / "t", lambda m, d: m["replaced"]["2"]["spec"].__setitem__(
        "in_features", 13))
    refused(folder, tmp_path / "t", "tensor '2.weight' has shape [8, 12], the model needs [8, 13]", model=fresh)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(3, 8)
    assert torch.equal(load_model(tmp_path / "saved", model=make())(x), pruned(x))


def test_save_refuses_a_module_load_could_not_rebuild(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    changed = copy.deepcopy(model)
    changed[1] = torch.nn.GELU()
    with pytest.raises(OptistackError, match="cannot rebuild"):
        save_model(tmp_path / "x", changed, model, [], {})


def test_save_refuses_a_step_that_load_would_not_rerun(tmp_path):
    from optistack.core.registry import get_pass_class

    model = tiny_llama(vocab_size=128)
    attention = get_pass_class("attention")(impl="flash_attention_2", causal_lm_only=False)
    with pytest.raises(OptistackError, match="cannot save: steps.0..config.impl"):
        save_model(tmp_path / "x", model, model, [step(attention)], {})
    assert not (tmp_path / "x").exists()


def test_loaded_model_is_bit_identical_and_lists_every_file(llama_folder):
    manifest = json.loads((llama_folder / "optistack.json").read_text())
    assert list(manifest["integrity"]["files"]) == ["model.safetensors"]
    assert manifest["base"] == {**manifest["base"], "library": "transformers", "class": "LlamaForCausalLM"}
    assert load_model(llama_folder)(IDS).logits.isfinite().all()


def test_saving_over_a_folder_of_the_users_is_refused_and_an_earlier_save_is_replaced(tmp_path):
    """`--save ./my-llama` on the folder the model came from must not replace its model.safetensors."""
    model = tiny_llama(vocab_size=128)
    p = RtnInt4Pass(group_size=32)
    result = p.apply(copy.deepcopy(model), PassContext())
    theirs = tmp_path / "my-llama"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"the user's weights")
    with pytest.raises(OptistackError, match="is not empty and is not an optistack save"):
        save_model(theirs, result.model, model, [step(p, result.info)], {})
    assert (theirs / "model.safetensors").read_bytes() == b"the user's weights"
    ours = tmp_path / "ours"
    for _ in range(2):  # an earlier save is ours to replace
        save_model(ours, result.model, model, [step(p, result.info)], {})
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(ours)(ids).logits, result.model(ids).logits)
