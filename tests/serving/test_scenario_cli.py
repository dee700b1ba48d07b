"""`optistack run --scenario server`: flag validation (before any model loads) and one end-to-end run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from optistack.cli import build_parser, main
from optistack.serving.backend import ServingError
from optistack.serving.scenario_cli import check_workload, options_from_args
from optistack.testing.models import tiny_llama, tiny_llama_workload

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import llama_folder  # noqa: E402


def _opts(*flags):
    return options_from_args(build_parser().parse_args(["run", "--model", "smollm2", "--pipeline", "identity", *flags]))


def test_flags_become_validated_options():
    assert _opts() is None
    o = _opts("--scenario", "server", "--qps-max", "3", "--ttft-limit", "1.5", "--tpot-limit", "0.05",
              "--scenario-samples", "6", "--scenario-steps", "2", "--scenario-seed", "0")
    assert (o.qps_max, o.ttft_limit_s, o.tpot_limit_s, o.samples, o.server_samples, o.search_steps, o.seed) == \
        (3.0, 1.5, 0.05, 6, 6, 2, 0)
    assert _opts("--scenario", "server").ttft_limit_s == 2.0 and _opts("--scenario", "server").tpot_limit_s == 0.1


@pytest.mark.parametrize("flags, words", [
    (["--qps-max", "3"], "--qps-max applies only with --scenario server"),
    (["--scenario-plot", "x.png"], "--scenario-plot applies only with --scenario server"),
    (["--scenario", "server", "--ttft-limit", "0"], "--ttft-limit must be a number > 0; got 0.0"),
    (["--scenario", "server", "--qps-max", "nan"], "--qps-max must be a number > 0"),
    (["--scenario", "server", "--scenario-steps", "0"], "--scenario-steps must be an integer >= 1"),
    (["--scenario", "server", "--scenario-samples", "4", "--scenario-run-samples", "8"],
     "--scenario-run-samples: server_samples \\(8\\) must be <= samples \\(4\\)"),
    (["--scenario", "server", "--qps-min", "5", "--qps-max", "1"], "--qps-min: qps_min \\(5.0\\) must be <= qps_max"),
    (["--scenario", "server", "--scenario-input-tokens", "64"], "--scenario-input-tokens must be LO,HI"),
    (["--scenario", "server", "--scenario-output-tokens", "1,8"], "--scenario-output-tokens: output_tokens must be"),
])
def test_one_clear_error_per_bad_flag(flags, words):
    with pytest.raises(ServingError, match=words):
        _opts(*flags)


def test_the_command_refuses_before_loading_anything(capsys):
    assert main(["run", "--model", "smollm2", "--pipeline", "identity", "--tpot-limit", "0.2"]) == 2
    assert "--tpot-limit applies only with --scenario server" in capsys.readouterr().err


def test_only_a_causal_lm_workload_is_served():
    with pytest.raises(ServingError, match="needs a causal-LM workload"):
        check_workload(tiny_llama_workload(tiny_llama(vocab_size=128)), _opts("--scenario", "server"))


@pytest.mark.slow
def test_run_with_the_server_scenario_writes_the_section_the_tables_and_the_plot(tmp_path, capsys):
    from optistack.bench.report import Report

    folder = llama_folder(tmp_path / "m", max_position_embeddings=1024)  # a real model folder, loaded as a causal LM
    out, png = tmp_path / "report.json", tmp_path / "load.png"
    rc = main(["run", "--model", str(folder), "--pipeline", "identity", "--quick", "--scenario", "server",
               "--scenario-samples", "6", "--scenario-steps", "2", "--qps-min", "4", "--qps-max", "16",
               "--scenario-seed", "1", "--scenario-plot", str(png), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "server scenario (MLPerf LoadGen)" in text and "optimized vs stock" in text
    d = json.loads(out.read_text())["scenario"]
    assert d["schema"] == "optistack.scenario/1" and d["limits"] == {"ttft_s": 2.0, "tpot_s": 0.1, "percentile": 0.99}
    assert [b["role"] for b in d["backends"]] == ["stock", "optimized"]
    for b in d["backends"]:
        assert b["offline"]["answered"] == 6 and len(b["server_runs"]) >= 1
        assert [r["offered_qps"] for r in b["server_runs"]][0] == 4.0
    assert d["samples"]["count"] == 6 and d["samples"]["new_tokens"][0] >= 16 and d["samples"]["prompt_tokens"][1] <= 512
    assert Report.load(out).scenario == d  # the section survives a reload
    assert png.read_bytes()[:4] == b"\x89PNG"
