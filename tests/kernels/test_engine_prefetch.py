"""The decode GEMVs' prefetch distance (simd.h: prefetch_far, far by default, $OPTISTACK_PREFETCH to
override) changes where the weights are asked for, never the arithmetic: the same logits bit for bit either way.
Each setting is read once per process, so each runs in its own."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")

SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {here!r})
from optistack.kernels import cpu
assert cpu.lib().prefetch_far() == (os.environ["OPTISTACK_PREFETCH"] == "far")  # the override took
from test_llama_engine import quantized, tiny
from optistack.kernels.llama_engine import EngineWeights
weights = EngineWeights.from_model(quantized(tiny(layers=2)))
out = []
for act_bits in (8, 16):
    rt = weights.runtime(3, 32, act_bits=act_bits)
    g = torch.Generator().manual_seed(act_bits)
    slots, pos = torch.tensor([0] * 5 + [1] * 3 + [2]), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0])
    rows = (torch.randint(0, 300, (9,), generator=g), slots, pos)
    out.append(rt.forward(*rows, torch.arange(9)))
    tok = out[-1][[4, 7, 8]].argmax(-1)
    out.append(rt.forward(tok, torch.arange(3), torch.tensor([5, 3, 1]), torch.arange(3)))
torch.save(out, sys.argv[1])
"""


def test_far_and_near_prefetches_give_the_same_logits(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(here=here))
    results = {}
    for mode in ("far", "near"):
        out = tmp_path / f"{mode}.pt"
        env = {**os.environ, "OPTISTACK_PREFETCH": mode, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = torch.load(out)
    assert len(results["far"]) == 4
    for far, near in zip(results["far"], results["near"]):
        assert torch.isfinite(far).all()
        assert torch.equal(far, near)
