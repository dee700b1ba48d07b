"""examples/server_scenario.py runs on a tiny model folder: both backends measured, the plot and the JSON written."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlperf_loadgen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import llama_folder  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "server_scenario.py"


@pytest.mark.slow
def test_the_example_measures_stock_and_optimized(tmp_path):
    spec = importlib.util.spec_from_file_location("server_scenario", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder = llama_folder(tmp_path / "m", max_position_embeddings=1024)
    png, out = tmp_path / "load.png", tmp_path / "scenario.json"
    scenario = example.main(["--model", str(folder), "--pipeline", "identity", "--quick", "--samples", "6",
                             "--steps", "2", "--qps-max", "20", "--plot", str(png), "--json", str(out)])
    assert [b.role for b in scenario.backends] == ["stock", "optimized"]
    assert all(b.offline.answered == 6 for b in scenario.backends)
    assert json.loads(out.read_text())["schema"] == "optistack.scenario/1"
    assert png.read_bytes()[:4] == b"\x89PNG"
