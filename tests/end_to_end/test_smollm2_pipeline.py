"""End-to-end on the bundled SmolLM2 through the command line, as a user would run it."""
import json

import pytest

from optistack.cli import main

pytestmark = pytest.mark.slow


def test_cli_run_bf16_on_smollm2_writes_a_full_report(tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(["run", "--model", "smollm2", "--pipeline", "cast{dtype=bf16}", "--json", str(out), "--quick",
                 "--max-accuracy-drop", "0.05", "--markdown", str(tmp_path / "out.md")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "optistack.report/1" and report["pipeline"] == "cast"  # bf16 is the default
    base_ppl = report["baseline"]["accuracy"]["perplexity"]
    assert 5 < base_ppl < 30
    step = report["steps"][0]
    assert step["status"] == "applied", step["reason"]
    assert step["accuracy"]["metric"] == "perplexity" and step["accuracy"]["higher_is_better"] is False
    assert step["accuracy"]["after"] < base_ppl * 1.05
    assert step["model_bytes"] == pytest.approx(report["baseline"]["model_bytes"] / 2, rel=0.01)
    for key in ("ttft_ms", "tpot_ms", "tokens_per_s", "p99_token_ms"):
        assert step["extra"][key] > 0
    markdown = (tmp_path / "out.md").read_text()
    assert "cast" in markdown and "perplexity" in markdown
    assert main(["report", str(out), "--format", "md"]) == 0
    assert "cast" in capsys.readouterr().out


def test_smollm2_exports_to_onnx_with_matching_logits_and_perplexity(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx.json"
    code = main(["run", "--model", "smollm2", "--pipeline", "onnx-export", "--json", str(out), "--quick"])
    assert code == 0
    report = json.loads(out.read_text())
    step = report["steps"][0]
    assert step["status"] == "applied", step["reason"]
    assert step["info"]["max_rel_diff"] <= 1e-3  # ONNX logits vs torch, on a 1 x 512 calibration window
    base_ppl = report["baseline"]["accuracy"]["perplexity"]
    assert step["accuracy"]["after"] == pytest.approx(base_ppl, rel=1e-3)  # perplexity of the ONNX model
