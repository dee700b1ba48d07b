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


def test_an_empty_pipeline_is_exit_2_with_one_line_before_a_model_loads(capsys, monkeypatch):
    import optistack.workloads

    def never(*a, **k):
        raise AssertionError("the model must not load for an empty pipeline")

    monkeypatch.setattr(optistack.workloads, "load", never)
    for text in ("", "   ", "\t"):
        for command in ("run", "demo"):
            assert main([command, "--pipeline", text]) == 2
            err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optistack: error")]
            assert len(err) == 1 and "pipeline is empty" in err[0]


def test_verbose_prints_the_traceback_of_a_failed_step(capsys, monkeypatch, tmp_path):
    import optistack.cli
    import optistack.workloads
    from optistack.core.pass_protocol import ConfiguredPass
    from optistack.core.registry import register_pass, unregister_pass
    from optistack.workloads.generic import GenericWorkload

    class Crash(ConfiguredPass):
        name = "test-cli-crash"

        def apply(self, model, ctx):
            return _crash_inside_the_pass()

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    monkeypatch.setattr(optistack.workloads, "load", lambda name, *a, **k: GenericWorkload(model, torch.randn(4, 16)))
    monkeypatch.setattr(optistack.cli, "_timing", lambda quick: TimingConfig(warmup=1, min_rounds=3, max_rounds=3))
    register_pass(Crash)
    try:
        out_json = tmp_path / "r.json"
        assert main(["run", "--pipeline", "test-cli-crash,identity", "--json", str(out_json)]) == 0
        assert "_crash_inside_the_pass" not in capsys.readouterr().err  # quiet without --verbose
        assert main(["run", "--pipeline", "test-cli-crash,identity", "--verbose"]) == 0
        err = capsys.readouterr().err
        assert "#1 test-cli-crash failed: KeyError: 'no such layer'" in err
        assert "Traceback (most recent call last)" in err and "_crash_inside_the_pass" in err
        step = json.loads(out_json.read_text())["steps"][0]
        assert step["status"] == "failed" and "_crash_inside_the_pass" in step["traceback"]
    finally:
        unregister_pass(Crash.name)


def _crash_inside_the_pass():
    raise KeyError("no such layer")
