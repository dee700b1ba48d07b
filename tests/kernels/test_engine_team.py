"""The engine's team under contention (csrc/cpu/llama_team.h): when another process holds one of its cores, calls
run with a thread fewer, with the same results, and the team grows back once the core is free again."""
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

HOG = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); print('ready', flush=True)\nwhile True: pass"


@pytest.fixture(scope="module")
def runtime():
    from optistack.kernels.llama_engine import EngineWeights

    # big enough that a decode call takes over a millisecond (shorter ones keep the full team: llama_team.h),
    # small enough for the suite (~30 MB of int4 weights)
    model = tiny(hidden=1024, inter=2816, layers=6, heads=8, kv=2)
    return EngineWeights.from_model(quantized(model)).runtime(1, 1024)


def decode(rt, steps: int, start: int) -> tuple[list[torch.Tensor], list[int]]:
    """`steps` decode calls of slot 0 from position `start`: their logits and the team each next call would use."""
    e = rt.impl
    logits, teams = [], []
    for i in range(steps):
        logits.append(e.forward(torch.tensor([7 + i % 50]), torch.tensor([0]), torch.tensor([start + i]),
                                torch.tensor([0])))
        teams.append(int(e.team_threads))
    return logits, teams


def pin(cpus: dict[int, set[int]] | set[int]) -> dict[int, set[int]]:
    """Every thread of this process (OpenMP's workers too, which pinning the main thread alone leaves where
    they are) onto `cpus` (or each onto its own set); returns what each had."""
    before = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus[tid] if isinstance(cpus, dict) else cpus)
        except (OSError, KeyError):  # a thread that ended meanwhile, or one born since
            pass
    return before


def prompt(rt) -> None:
    rt.impl.set_length(0, 0)
    rt.impl.forward(torch.arange(3, 35), torch.zeros(32, dtype=torch.long), torch.arange(32), torch.tensor([31]))


def test_the_policy_is_on_by_default_and_follows_torchs_thread_count(runtime):
    e = runtime.impl
    threads = torch.get_num_threads()
    try:
        assert e.adaptive_threads is True
        torch.set_num_threads(1)
        assert e.team_threads == 1
        prompt(runtime)
        assert 0.0 < e.last_work_ratio <= 1.2  # one thread keeps at most one thread busy (clock granularity aside)
        e.adaptive_threads = False
        torch.set_num_threads(2)
        assert e.team_threads == 2
    finally:
        e.adaptive_threads = True
        torch.set_num_threads(threads)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to share one with another process")
def test_a_busy_core_shrinks_the_team_with_the_same_logits_and_a_free_one_grows_it_back(runtime):
    """This process on two CPUs, another one spinning on the first: the team of 2 is held up at its barriers and
    calls go on with 1 thread (same logits as a team of 2 computes undisturbed); once the other process is gone,
    a probe finds the team unhindered and it grows back to 2."""
    e = runtime.impl
    threads = torch.get_num_threads()
    a, b = sorted(os.sched_getaffinity(0))[:2]
    hog, affinity = None, {}
    try:
        torch.set_num_threads(2)
        affinity = pin({a, b})
        e.adaptive_threads = False
        prompt(runtime)
        reference, _ = decode(runtime, 64, 32)
        e.adaptive_threads = True
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(a)], stdout=subprocess.PIPE, text=True)
        assert hog.stdout.readline().strip() == "ready"
        shrank = False
        for _ in range(20):  # windows of calls (32 ms each) are judged: a few seconds at most
            prompt(runtime)
            logits, teams = decode(runtime, 64, 32)
            for got, want in zip(logits, reference):
                assert torch.equal(got, want)
            if 1 in teams:
                shrank = True
                break
        assert shrank, f"the team never shrank beside a busy core (last work ratio {e.last_work_ratio:.2f})"
        hog.kill()
        hog.wait()
        hog = None
        deadline = time.monotonic() + 20  # the hold (0.25 s, doubled by each failed probe) and a probe's window
        while e.team_threads != 2 and time.monotonic() < deadline:
            prompt(runtime)
            decode(runtime, 64, 32)
        assert e.team_threads == 2, f"the team did not grow back on a free core (last work ratio {e.last_work_ratio:.2f})"
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        pin(affinity)
        torch.set_num_threads(threads)
        e.adaptive_threads = True


def test_the_environment_fixes_the_team_of_engines_built_afterwards(monkeypatch):
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny()))
    monkeypatch.setenv("OPTISTACK_ENGINE_THREADS", "fixed")
    rt = weights.runtime(1, 64)
    assert rt.adaptive_threads is False and rt.team_threads == torch.get_num_threads()
    rt.adaptive_threads = True
    assert rt.impl.adaptive_threads is True
    monkeypatch.setenv("OPTISTACK_ENGINE_THREADS", "Auto")
    assert weights.runtime(1, 64).adaptive_threads is True
    monkeypatch.setenv("OPTISTACK_ENGINE_THREADS", "2")
    with pytest.raises(ValueError, match="OPTISTACK_ENGINE_THREADS must be 'auto'.*'fixed'.*got '2'"):
        weights.runtime(1, 64)
