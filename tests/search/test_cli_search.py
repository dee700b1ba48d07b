"""`optistack search` on the command line: same search, rich output, the best text printed last."""
import pytest
from search_helpers import tiny_mlp_workload

from optistack import cli
from optistack.core.registry import register_workload


@pytest.fixture(autouse=True)
def tiny_registered():
    register_workload("tiny-mlp", tiny_mlp_workload)


def test_cli_search_prints_the_best_pipeline_and_writes_outputs(tmp_path, capsys, monkeypatch):
    # whether a tiny MLP trial beats the original is timing noise; the rule has its own tests
    monkeypatch.setattr("optistack.search.result.beats_original", lambda record, objective: True)
    db, md, png = tmp_path / "s.db", tmp_path / "s.md", tmp_path / "s.png"
    code = cli.main(["search", "--model", "tiny-mlp", "--candidates", "identity,int8-dynamic",
                     "--candidates", "prune-magnitude{sparsity=0.3|0.5}", "--budget", "5", "--max-accuracy-drop",
                     "0.05", "--store", str(db), "--quick", "--markdown", str(md), "--plot", str(png)])
    out = capsys.readouterr()
    assert code == 0 and db.exists() and png.exists() and "| pipeline |" in md.read_text()
    best = out.out.strip().splitlines()[-1]
    assert best.startswith("best pipeline: ")
    text = best.removeprefix("best pipeline: ")
    assert "optistack run --model tiny-mlp --pipeline '" + text + "'" in out.err
    assert cli.main(["run", "--model", "tiny-mlp", "--pipeline", text, "--quick"]) == 0  # accepted unchanged


def test_cli_search_bad_budget_is_one_clear_error(capsys):
    assert cli.main(["search", "--model", "tiny-mlp", "--candidates", "identity", "--budget", "soon"]) == 2
    assert "budget must be a number of trials" in capsys.readouterr().err


def test_cli_search_says_when_nothing_beat_the_original(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("optistack.search.result.beats_original", lambda record, objective: False)
    code = cli.main(["search", "--model", "tiny-mlp", "--candidates", "identity", "--budget", "1",
                     "--max-accuracy-drop", "0.05", "--quick", "--store", str(tmp_path / "s.db")])
    out = capsys.readouterr().out
    assert code == 0 and "beat the original model" in out and "best pipeline:" not in out
