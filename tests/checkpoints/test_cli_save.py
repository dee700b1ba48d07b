"""The issue's bar, on a tiny folder: `optistack run --model <folder> --data <text> --pipeline awq --json r.json
--save out` works end to end, and `out` scores the same perplexity when transformers loads it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import llama_folder  # noqa: E402


def test_run_awq_on_a_folder_with_data_saves_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("compressed_tensors")
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM

    from optistack.cli import main
    from optistack.workloads import load

    folder = llama_folder(tmp_path / "llama")
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(topics[k] for k in sorted(topics)[40:70]))
    out, report = tmp_path / "out", tmp_path / "r.json"
    rc = main(["run", "--model", str(folder), "--data", str(data), "--pipeline", "awq{calib_samples=8,n_grid=4}",
               "--quick", "--json", str(report), "--save", str(out)])
    assert rc == 0
    r = json.loads(report.read_text())
    split = r["workload"]["data_split"]
    assert split["disjoint"] and split["data"] == str(data)
    step = r["steps"][0]
    assert step["status"] == "applied"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    wl = load(str(folder), data=data)  # the same split, so the same evaluation text
    ppl = wl.evaluate(reloaded)["perplexity"]
    assert abs(ppl / step["accuracy"]["after"] - 1) < 0.005


def test_save_refusal_is_a_clear_cli_error(tmp_path, capsys):
    from optistack.cli import main

    folder = llama_folder(tmp_path / "llama")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    rc = main(["run", "--model", str(folder), "--pipeline", "identity", "--quick", "--save", str(tmp_path / "taken")])
    assert rc == 2 and "not written by optistack" in capsys.readouterr().err


def test_a_model_only_optistack_runs_is_saved_in_its_own_format_by_default(tmp_path, capsys):
    """`--save` (auto): fuse-kernels' layers have no Hugging Face form, so the folder is optistack's own, the
    reason is printed, and optistack.load_model reads it back to the same outputs; `--save-format hf` asked
    explicitly is the clear error it was, with nothing written."""
    import torch

    from optistack import load_model
    from optistack.cli import main
    from optistack.kernels import cpu

    if not cpu.available():
        pytest.skip(cpu.available().reason)
    folder = llama_folder(tmp_path / "llama")
    chain = "rtn-int4,fuse-kernels"
    rc = main(["run", "--model", str(folder), "--pipeline", chain, "--quick", "--save", str(tmp_path / "hf"),
               "--save-format", "hf"])
    assert rc == 2 and "only optistack runs it" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    rc = main(["run", "--model", str(folder), "--pipeline", chain, "--quick", "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0 and "saved (optistack serve / optistack.load_model)" in err and "not a Hugging Face folder" in err
    assert (tmp_path / "out" / "optistack.json").is_file() and not (tmp_path / "out" / "config.json").exists()
    model = load_model(tmp_path / "out")
    ids = torch.randint(4, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    again = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert type(model.model.layers[0].mlp).__name__ == "FusedGatedMLP"
    rc = main(["run", "--model", str(folder), "--pipeline", "identity", "--quick", "--save", str(tmp_path / "own"),
               "--save-format", "optistack"])
    assert rc == 0 and (tmp_path / "own" / "optistack.json").is_file()
