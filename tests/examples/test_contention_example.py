"""examples/engine_under_contention.py runs: the engine decodes the same tokens quiet and beside a busy process,
with its thread policy off and on (the example asserts it and says so)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "engine_under_contention.py"


@pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                    reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")
def test_example_decodes_the_same_tokens_quiet_and_beside_a_busy_process(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--tokens", "24"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the example sets 2
    out = capsys.readouterr().out
    assert "tokens identical in every run: True" in out
    assert out.count("busy process(es), round") == 4
