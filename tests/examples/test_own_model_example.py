"""examples/own_model_to_vllm.py runs on a tiny folder: saves, reloads, and the reload scores the same."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import llama_folder  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_model_to_vllm.py"


def test_example_saves_a_checkpoint_that_reloads_with_the_same_perplexity(tmp_path):
    pytest.importorskip("compressed_tensors")
    spec = importlib.util.spec_from_file_location("own_model_to_vllm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder = llama_folder(tmp_path / "m")
    out = example.main(["--model", str(folder), "--pipeline", "rtn-int4", "--out", str(tmp_path / "q"), "--quick"])
    assert Path(out["out"], "config.json").is_file()
    assert out["reloaded_perplexity"] == pytest.approx(out["perplexity"], rel=0.005)
