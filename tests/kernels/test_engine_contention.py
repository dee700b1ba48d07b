"""The engine under contention: with other processes holding every core, its threads wait at barriers for
partners that are not running, so it backs off to one thread (llama_decode.cpp, forward()); the logits do
not change, since a row computes the same bits on any thread count."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
from test_llama_engine import quantized, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")

CPUS = len(os.sched_getaffinity(0))


def decode(rt, ids, steps: int) -> torch.Tensor:
    rt.rewind(0, 0)
    rt.forward(ids, torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids)), torch.arange(0))
    tok, out = ids[-1:], []
    for i in range(steps):
        logits = rt.forward(tok, torch.tensor([0]), torch.tensor([len(ids) + i]), torch.tensor([0]))
        out.append(logits)
        tok = logits.argmax(-1)
    return torch.cat(out)


@pytest.mark.skipif(not 2 <= CPUS <= 8, reason="needs 2-8 CPUs to oversubscribe them all with a few busy processes")
def test_contended_threads_back_off_to_one_and_compute_the_same():
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(layers=4)))
    ids = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quiet = weights.runtime(1, 64)
        want = decode(quiet, ids, 24)
        rt = weights.runtime(1, 64)
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3 * CPUS)]
        try:
            deadline = time.monotonic() + 60  # a bound on the loop, not an assertion on time
            while rt.impl.contended_calls == 0 and time.monotonic() < deadline:
                got = decode(rt, ids, 24)
                assert torch.equal(got, want)  # the same bits while switching between 2 threads and 1
        finally:
            for h in hogs:
                h.kill()
            for h in hogs:
                h.wait()
        assert rt.impl.contended_calls >= 1, "three busy processes per CPU never showed as contention"
        assert rt.impl.solo_calls >= 1
        assert torch.equal(decode(rt, ids, 24), want)
    finally:
        torch.set_num_threads(before)
