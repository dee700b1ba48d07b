"""Workloads for the user's own model folders and data files (tiny folders made offline in tmp dirs)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import bert_folder, llama_folder  # noqa: E402

from optistack.core.errors import WorkloadError  # noqa: E402
from optistack.workloads import load  # noqa: E402
from optistack.workloads.data_files import read_data, split_records  # noqa: E402
from optistack.workloads.tasks import infer_task  # noqa: E402


def _paragraphs(n: int = 40) -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)[30 : 30 + n]
    return [" ".join(topics[k].split()[:120]) for k in keys]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": llama_folder(root / "llama"), "bert": bert_folder(root / "bert"),
            "cls": bert_folder(root / "cls", head="cls")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    texts = _paragraphs()
    labels = ["positive" if i % 2 else "negative" for i in range(len(texts))]
    (root / "t.txt").write_text("\n\n".join(texts))
    (root / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels)))
    import csv

    with (root / "t.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["sentence", "label"])
        w.writeheader()
        w.writerows({"sentence": t, "label": y} for t, y in zip(texts, labels))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc
    import pyarrow.parquet

    table = pa.table({"text": texts, "label": labels})
    pyarrow.parquet.write_table(table, root / "t.parquet")
    ds = root / "ds"
    ds.mkdir()
    with pyarrow.ipc.new_stream(str(ds / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (ds / "state.json").write_text("{}")
    return {"root": root, "texts": texts, "labels": labels}


@pytest.mark.parametrize("name", ["t.txt", "t.jsonl", "t.csv", "t.parquet", "ds"])
def test_every_data_format_reads_the_same_records(data, name):
    records = read_data(data["root"] / name)
    assert records.texts == data["texts"]
    if name != "t.txt":
        assert records.labels == data["labels"]


def test_split_is_disjoint_and_keeps_calibration():
    ev, cal = split_records(10, 0.5, max_eval=3)
    assert list(ev) == [0, 1, 2] and list(cal) == list(range(3, 10))
    with pytest.raises(WorkloadError, match="at least 2"):
        split_records(1)


def test_causal_lm_folder_with_data_scores_perplexity_on_a_disjoint_split(folders, data):
    w = load(str(folders["llama"]), data=data["root"] / "t.txt")
    assert w.kind == "causal-lm" and w.metric.name == "perplexity"
    split = w.describe()["data_split"]
    assert split["disjoint"] and split["eval_tokens"] <= split["calibration_tokens"]
    first_calib = int(split["calibration"].split()[1].split("..")[0])
    assert split["eval"].endswith(f"..{first_calib - 1}")  # eval records end where calibration begins
    ppl = w.evaluate(w.model)["perplexity"]
    assert math.isfinite(ppl) and ppl > 1
    calib = w.calibration_inputs(4)
    assert len(calib) == 4
    scored = w._chunks.reshape(-1)  # what evaluate scores comes from the eval records only...
    assert torch.equal(scored, w._data_eval[: scored.numel()])
    calib_ids = torch.cat([kw["input_ids"].reshape(-1) for _, kw in calib])  # ...calibration from the rest
    assert torch.equal(calib_ids, w._data_calib[: calib_ids.numel()])
    assert w._data_eval.numel() == split["eval_tokens"] and w._data_calib.numel() == split["calibration_tokens"]


def test_without_data_the_report_says_bundled_text(folders):
    w = load(folders["llama"])  # a pathlib.Path works too
    assert "bundled offline text" in w.describe()["data_split"]["data"]
    assert math.isfinite(w.evaluate(w.model)["perplexity"])


def test_encoder_folder_scores_cosine_to_the_original(folders, data):
    w = load(str(folders["bert"]), data=data["root"] / "t.jsonl")
    assert w.kind == "encoder" and w.metric.name == "cosine"
    assert w.evaluate(w.model)["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert w.describe()["data_split"]["eval_records"] == 20


def test_classifier_uses_accuracy_with_labels_and_agreement_without(folders, data):
    with_labels = load(str(folders["cls"]), data=data["root"] / "t.csv")
    assert with_labels.metric.name == "accuracy"
    scores = with_labels.evaluate(with_labels.model)
    assert scores["agreement"] == 1.0 and 0.0 <= scores["accuracy"] <= 1.0
    without = load(str(folders["cls"]), data=data["root"] / "t.txt")
    assert without.metric.name == "agreement" and without.evaluate(without.model)["agreement"] == 1.0


def test_task_comes_from_architectures_or_the_task_option(folders, tmp_path):
    assert infer_task({"architectures": ["MistralForCausalLM"]}) == "causal-lm"
    assert infer_task({"architectures": ["GPT2LMHeadModel"]}) == "causal-lm"
    assert infer_task({"architectures": ["RobertaForSequenceClassification"]}) == "sequence-classification"
    assert infer_task({"architectures": ["ViTForImageClassification"]}) == "image-classification"
    assert infer_task({"architectures": ["BertModel"]}) == "encoder"
    with pytest.raises(WorkloadError, match="pass --task"):
        infer_task({"architectures": ["BertForMaskedLM"]})
    assert infer_task({"architectures": ["BertForMaskedLM"]}, task="encoder") == "encoder"
    w = load(str(folders["cls"]), task="encoder")  # override: the backbone's embeddings, scored by cosine
    assert w.kind == "encoder"


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4)), torch.randn(2, 8)\n"
        "def not_a_pair():\n"
        "    return 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    w = load("my_models:build")
    assert w.kind == "generic" and w.evaluate(w.model)["rel_error"] == 0.0
    with pytest.raises(WorkloadError, match="expected a Workload"):
        load("my_models:not_a_pair")
    with pytest.raises(WorkloadError, match="takes no 'data'"):
        load("my_models:build", data=tmp_path / "my_models.py")
    with pytest.raises(WorkloadError, match="cannot import"):
        load("no_such_module_xyz:build")


def test_bad_inputs_give_one_clear_error(folders, data, tmp_path):
    with pytest.raises(WorkloadError, match="no such file or folder"):
        load(str(tmp_path / "missing-model"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(WorkloadError, match="not a .gguf"):
        load(str(tmp_path / "weights.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkloadError, match="no config.json"):
        load(str(empty))
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (empty / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(WorkloadError, match="pickled weights"):
        load(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(WorkloadError, match="line 2 is not valid JSON"):
        load(str(folders["llama"]), data=bad)
    with pytest.raises(WorkloadError, match="unsupported file type"):
        load(str(folders["llama"]), data=tmp_path / "weights.bin")
    with pytest.raises(WorkloadError, match="no such file"):
        load(str(folders["llama"]), data=tmp_path / "nope.txt")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("a,b\nx,y\nz,w\n")
    with pytest.raises(WorkloadError, match="cannot tell which column"):
        read_data(nocol)
    with pytest.raises(WorkloadError, match="unknown task"):
        load(str(folders["llama"]), task="translation")
    with pytest.raises(WorkloadError, match="takes no data"):
        load("smollm2-qa", data=data["root"] / "t.txt")


def test_cli_bad_model_path_exits_2(tmp_path, capsys):
    from optistack.cli import main

    assert main(["run", "--model", str(tmp_path / "nope"), "--pipeline", "identity"]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "Traceback" not in err


@pytest.mark.slow
def test_bundled_gguf_path_works_like_the_smollm2_workload():
    from optistack.bundled_models import smollm2_gguf

    by_path = load(str(smollm2_gguf()), ppl_chunks=2)  # two evaluation chunks keep `make test` short
    by_name = load("smollm2", ppl_chunks=2)
    assert by_path.kind == "causal-lm"
    assert by_path.evaluate(by_path.model)["perplexity"] == pytest.approx(
        by_name.evaluate(by_name.model)["perplexity"], rel=1e-4)


@pytest.mark.slow
def test_minilm_folder_works_like_the_minilm_workload():
    from optistack.bundled_models import minilm_dir

    by_path = load(str(minilm_dir()))
    assert by_path.kind == "encoder" and by_path.pooling == "mean"
    assert by_path.describe()["eval_sentences"] == load("minilm").describe()["eval_sentences"]


def test_image_classifier_folder_with_class_subfolders(tmp_path):
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    ViTForImageClassification(cfg).eval().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    for c, seed in (("cat", 0), ("dog", 10)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            pixels = np.random.RandomState(seed + i).randint(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    w = load(str(tmp_path / "vit"), data=tmp_path / "imgs")
    assert w.metric.name == "accuracy" and w.describe()["data_split"]["eval_images"] == 5
    assert w.evaluate(w.model)["agreement"] == 1.0
    assert load(str(tmp_path / "vit")).metric.name == "agreement"  # no data: synthetic images, agreement only
