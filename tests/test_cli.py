import json

import torch

import optistack as ost
from optistack.bench.timer import TimingConfig
from optistack.cli import main


def test_passes_lists_every_pass_with_availability(capsys):
    assert main(["passes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"identity", "cast", "compile", "int8-dynamic", "int8-weight", "prune-magnitude", "prune-structured"} <= set(rows)
    for r in rows.values():
        assert r["available"] or r["reason"]
    assert rows["compile"]["gives"] == "compiled"


def test_passes_table_renders(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row, so the reason can be matched whole
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "prune-structured" in out
    import torch

    if not torch.cuda.is_available():  # the extra's name survives rich's markup (it is not a style tag)
        assert "optistack[tensorrt]" in out


def test_bad_input_is_one_clear_error_not_a_traceback(capsys):
    assert main(["run", "--model", "minilm", "--pipeline", "int8-dynamik"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'int8-dynamic'" in err and "Traceback" not in err
    assert main(["run", "--model", "nosuchmodel", "--pipeline", "identity"]) == 2
    assert "unknown workload 'nosuchmodel'" in capsys.readouterr().err
    assert main(["run", "--pipeline", "prune-magnitude{sparsity=7}"]) == 2
    assert "prune-magnitude" in capsys.readouterr().err
    assert main(["report", "does-not-exist.json"]) == 2


def test_report_rerenders_a_saved_report_in_every_format(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
    result = ost.optimize(model, torch.randn(8, 32), "identity,prune-magnitude{sparsity=0.5}",
                          timing=TimingConfig(warmup=1, min_rounds=3, max_rounds=3), verbose=False)
    path = result.report.save(tmp_path / "r.json")
    for fmt in ("text", "md", "html", "json"):
        assert main(["report", str(path), "--format", fmt]) == 0
        assert "prune-magnitude" in capsys.readouterr().out
    png = tmp_path / "r.png"
    assert main(["report", str(path), "--format", "png", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
