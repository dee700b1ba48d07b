"""A trial resumes core's one runner from a cached prefix, timing inside the lock it was given."""
from __future__ import annotations

import contextlib

import pytest
import torch
from search_helpers import FAST

from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import register_pass, unregister_pass
from optistack.search.trial import TrialRunner


class RecordingLock:
    def __init__(self):
        self.events: list[str] = []

    @contextlib.contextmanager
    def work(self):
        self.events.append("work")
        yield

    @contextlib.contextmanager
    def timing(self):
        self.events.append("timing")
        yield


class CountingPrune(ConfiguredPass):
    """Counts its applications, so a reused prefix is seen not to run again."""

    name = "test-trial-count"
    calls = 0

    def apply(self, model, ctx):
        type(self).calls += 1
        with torch.no_grad():
            model[0].weight.mul_(0.999)
        return PassResult(model)


class Poison(ConfiguredPass):
    name = "test-trial-nan"

    def apply(self, model, ctx):
        with torch.no_grad():
            model[0].weight.fill_(float("nan"))
        return PassResult(model)


def test_a_trial_resumes_from_the_cached_prefix_under_the_lock(tiny_workload):
    register_pass(CountingPrune)
    register_pass(Poison)
    try:
        lock = RecordingLock()
        runner = TrialRunner(tiny_workload, FAST, lock=lock)
        first = runner.run("test-trial-count")
        assert first.status == "ok" and CountingPrune.calls == 1
        assert lock.events.count("timing") >= 2  # the baseline and the step were timed inside the lock
        second = runner.run("test-trial-count,identity")
        assert second.reused_prefix == "test-trial-count" and CountingPrune.calls == 1  # not applied again
        steps = second.report["steps"]
        assert [s["text"] for s in steps] == ["test-trial-count", "identity"]
        assert [s["status"] for s in steps] == ["applied", "applied"]
        # the always-on gate refuses non-finite outputs in a trial too; the rest is not run
        third = runner.run("test-trial-nan,identity")
        assert [s["status"] for s in third.report["steps"]] == ["rejected", "skipped"]
        assert "not run" in third.report["steps"][1]["reason"] and third.status == "rejected"
    finally:
        unregister_pass(CountingPrune.name)
        unregister_pass(Poison.name)


def test_the_timing_lock_names_and_the_old_gate_names_that_warn():
    from optistack.search import ray_executor, trial

    assert not [name for name in (*vars(trial), *vars(ray_executor)) if "gate" in name.lower() and name != "GateInstrument"]
    for module, old, new in [(trial, "NoGate", "NoLock"), (ray_executor, "GateActor", "TimingLockActor"),
                             (ray_executor, "RayGate", "RayTimingLock"), (ray_executor, "GATE_NAME", "LOCK_NAME")]:
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated and will be removed in optistack 0.2.0: use {new}"):
            assert getattr(module, old) is getattr(module, new)
    with pytest.raises(AttributeError):
        trial.NoSuchLock
