"""examples/qwen3_and_smollm3.py runs: both architectures on the engine with the model's own greedy tokens
(the example exits non-zero otherwise), and its Qwen3 GGUF is written."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen3_and_smollm3.py"


@pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                    reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")
def test_example_runs_both_architectures_and_writes_the_gguf(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--tokens", "6", "--gguf", str(tmp_path / "q3.gguf")])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("greedy tokens identical: True") == 2
    assert (tmp_path / "q3.gguf").stat().st_size > 0
