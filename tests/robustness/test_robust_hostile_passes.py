"""Hostile third-party passes registered at run time: whatever a pass does, the caller's model and the
kept model stay intact, every step ends with a known status, and a step that did not apply says why."""
from __future__ import annotations

import math

import pytest
import torch
from robust_helpers import (
    QUICK,
    assert_unchanged,
    call,
    check_steps,
    rel_error,
    snapshot,
)
from torch import nn

import optistack as ost
from optistack.core.errors import PreconditionError
from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import unregister_pass


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()


X = torch.randn(16, 64)


def _zero_all(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


class MutateThenRaise(ConfiguredPass):
    name = "robust-mutate-then-raise"

    def apply(self, model, ctx):
        _zero_all(model)
        model[0] = nn.Identity()
        raise RuntimeError("half-way through, then broke")


class ReturnsModel(ConfiguredPass):
    name = "robust-returns-model"

    def apply(self, model, ctx):
        _zero_all(model)
        return model  # not a PassResult


class ReturnsNone(ConfiguredPass):
    name = "robust-returns-none"

    def apply(self, model, ctx):
        return None


class NaNWeights(ConfiguredPass):
    name = "robust-nan-weights"

    def apply(self, model, ctx):
        with torch.no_grad():
            model[2].weight.fill_(float("nan"))
        return PassResult(model)


class WrongShape(ConfiguredPass):
    name = "robust-wrong-shape"

    def apply(self, model, ctx):
        model[2] = nn.Linear(256, 3)
        return PassResult(model)


class ClaimsModified(ConfiguredPass):
    name = "robust-claims-modified"

    def apply(self, model, ctx):
        return PassResult(model, modified=True, info={"note": "did nothing"})


class SaysNothing(ConfiguredPass):
    name = "robust-says-nothing"

    def apply(self, model, ctx):
        return PassResult(model, modified=False)


class Precondition(ConfiguredPass):
    name = "robust-precondition"

    def apply(self, model, ctx):
        raise PreconditionError("needs a model with attention layers")


class BrokenRequirements(ConfiguredPass):
    name = "robust-broken-requirements"

    def requirements(self):
        raise ImportError("optional dependency exploded")

    def apply(self, model, ctx):
        return PassResult(model)


class CastsHalf(ConfiguredPass):
    name = "robust-casts-half"

    def apply(self, model, ctx):
        return PassResult(model.to(torch.float16))


class Cached(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.cache = inner, {}
        self.calls = self.hits = 0

    def forward(self, x):
        key = x.detach().numpy().tobytes()
        self.calls += 1
        if key in self.cache:
            self.hits += 1
        else:
            self.cache[key] = self.inner(x)
        return self.cache[key]


CACHE_UNTIMED_REPEATS = 2  # the untimed calls on the example batch (finite check, accuracy score) may repeat it


class CachePass(ConfiguredPass):
    name = "robust-cache"

    def apply(self, model, ctx):
        return PassResult(Cached(model))


HOSTILE = [MutateThenRaise, ReturnsModel, ReturnsNone, NaNWeights, WrongShape, ClaimsModified, SaysNothing,
           Precondition, BrokenRequirements, CastsHalf, CachePass]
NOT_APPLIED = {  # pass -> statuses it may end with
    MutateThenRaise.name: {"failed"},
    ReturnsModel.name: {"failed"},
    ReturnsNone.name: {"failed"},
    NaNWeights.name: {"rejected", "failed"},
    WrongShape.name: {"rejected", "failed"},
    SaysNothing.name: {"skipped"},
    Precondition.name: {"skipped"},
    BrokenRequirements.name: {"failed", "skipped"},
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    for cls in HOSTILE:
        ost.register_pass(cls)
    yield
    for cls in HOSTILE:
        unregister_pass(cls.name)


@pytest.mark.parametrize("after", ["", ",int8-dynamic"])
@pytest.mark.parametrize("cls", HOSTILE, ids=lambda c: c.name)
def test_hostile_pass_leaves_models_intact_and_explains(cls, after):
    model = _mlp()
    before = snapshot(model)
    reference = call(model, X)
    result = ost.optimize(model, X, f"int8-dynamic,{cls.name}{after}", timing=QUICK, verbose=False)
    check_steps(result)
    assert_unchanged(model, before)
    hostile = result.report.steps[1]
    if cls.name in NOT_APPLIED:
        assert hostile.status in NOT_APPLIED[cls.name], f"{cls.name}: {hostile.status} ({hostile.reason})"
        assert hostile.reason and hostile.reason.strip(), f"{cls.name}: {hostile.status} without a reason"
    out = call(result.model, X)
    assert torch.isfinite(out.float()).all(), "the kept model gives non-finite outputs"
    assert out.shape == reference.shape, "the kept model gives outputs of another shape"
    assert rel_error(out, reference) < 0.1, "the kept model drifted from the original"
    if hostile.status == "failed":  # the evidence is kept
        assert hostile.traceback, f"{cls.name}: failed without its traceback"
    json_text = result.report.to_json() if hasattr(result.report, "to_json") else None
    if json_text is not None:
        assert isinstance(json_text, str) and cls.name in json_text


def test_failed_step_keeps_type_message_and_traceback():
    result = ost.optimize(_mlp(), X, MutateThenRaise.name, timing=QUICK, verbose=False)
    step = result.report.steps[0]
    assert step.status == "failed"
    assert "RuntimeError" in step.reason and "half-way through" in step.reason
    assert step.traceback and "RuntimeError" in step.traceback and "apply" in step.traceback


def test_caching_pass_gains_nothing_from_repeated_inputs():
    """Timing rotates over distinct batches: a pass answering repeated inputs from memory cannot read fast."""
    model = _mlp()
    result = ost.optimize(model, torch.randn(64, 64), CachePass.name, verbose=False,
                          timing=ost.TimingConfig(warmup=1, min_rounds=6, max_rounds=8, max_seconds=3.0,
                                                  noise_floor=False))
    step = result.report.steps[0]
    assert step.status == "applied", step.reason  # outputs are exact: the gate has nothing against it
    cached = result.model
    assert isinstance(cached, Cached)
    # every timed call got a batch never seen before: the only repeats are the untimed scoring calls
    assert cached.calls >= 6 + CACHE_UNTIMED_REPEATS and cached.hits <= CACHE_UNTIMED_REPEATS, (cached.calls, cached.hits)
    # a cache hit costs microseconds against a ~ms forward; every timed call was a miss
    assert step.speedup is not None and math.isfinite(step.speedup["median"]), step.speedup
    assert step.speedup["median"] < 2.0, step.speedup
