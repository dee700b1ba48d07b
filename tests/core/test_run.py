"""The runner + benchmark instrument on a small real module: gate, rollback, failures, skips, timing."""
import hashlib
import time

import pytest
import torch

import optistack as ost
from optistack.bench.timer import TimingConfig
from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import register_pass, unregister_pass
from optistack.core.requirements import Availability

FAST = TimingConfig(warmup=1, min_rounds=5, max_rounds=10, max_seconds=5)


class Wreck(ConfiguredPass):
    name = "test-wreck"

    def apply(self, model, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0).add_(1.0)
        return PassResult(model)


class MakeNaN(ConfiguredPass):
    name = "test-nan"

    def apply(self, model, ctx):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return PassResult(model)


class Boom(ConfiguredPass):
    name = "test-boom"

    def apply(self, model, ctx):
        with torch.no_grad():
            next(model.parameters()).zero_()  # half-change the model, then fail
        raise RuntimeError("boom: unsupported layer")


class Unicorn(ConfiguredPass):
    name = "test-unicorn"

    def requirements(self):
        return Availability.no("needs a unicorn accelerator; none found")

    def apply(self, model, ctx):
        raise AssertionError("must not run")


class Slower(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        time.sleep(0.02)  # large against the MLP even when the machine is loaded
        return self.inner(x)


class SlowDown(ConfiguredPass):
    name = "test-slow"

    def apply(self, model, ctx):
        return PassResult(Slower(model))


@pytest.fixture(scope="module", autouse=True)
def test_passes():
    for cls in (Wreck, MakeNaN, Boom, Unicorn, SlowDown):
        register_pass(cls)
    yield
    for cls in (Wreck, MakeNaN, Boom, Unicorn, SlowDown):
        unregister_pass(cls.name)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).eval()


def checksum(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(pipeline, **kw):
    model = mlp()
    before = checksum(model)
    result = ost.optimize(model, torch.randn(64, 256), pipeline, timing=FAST, verbose=False, **kw)
    assert checksum(model) == before, "the caller's model must never be modified"
    return model, result


def statuses(result):
    return [(s.pass_name, s.status) for s in result.report.steps]


def test_a_pass_that_wrecks_accuracy_is_rejected_and_the_previous_model_kept():
    model, result = run("prune-magnitude{sparsity=0.1},test-wreck", max_accuracy_drop=0.05)
    assert statuses(result) == [("prune-magnitude", "applied"), ("test-wreck", "rejected")]
    wreck = result.report.steps[1]
    assert "exceeds the budget" in wreck.reason and wreck.accuracy.drop_from_original > 0.05
    assert wreck.speedup is not None  # a rejected step is still measured, so the user sees the trade
    pruned = result.report.steps[0].info
    assert (result.model[0].weight == 0).float().mean().item() == pytest.approx(0.1, abs=0.01), pruned


def test_non_finite_outputs_are_rejected_without_a_budget():
    _, result = run("test-nan,identity")
    assert statuses(result) == [("test-nan", "rejected"), ("identity", "applied")]
    assert "finite" in result.report.steps[0].reason
    assert torch.isfinite(result.model(torch.randn(2, 256))).all()


def test_a_failing_pass_is_recorded_and_the_pipeline_goes_on():
    model, result = run("test-boom,prune-magnitude{sparsity=0.2}")
    assert statuses(result) == [("test-boom", "failed"), ("prune-magnitude", "applied")]
    assert result.report.steps[0].reason == "RuntimeError: boom: unsupported layer"
    assert (result.model[0].weight != 0).float().mean() > 0.7  # the half-change did not leak


def test_an_unavailable_pass_is_skipped_with_its_reason():
    _, result = run("test-unicorn,identity")
    step = result.report.steps[0]
    assert step.status == "skipped" and step.reason == "needs a unicorn accelerator; none found"


def test_a_pass_that_makes_the_model_slower_is_reported_slower():
    _, result = run("test-slow")
    sp = result.report.steps[0].speedup
    assert sp["median"] < 0.9 and sp["ci95"][1] < 1.0


def test_identity_speedup_ci_contains_one():
    # A 95% CI misses the truth 5% of the time by construction; allow one re-measurement.
    for _ in range(2):
        _, result = run("identity")
        sp = result.report.steps[0].speedup
        if sp["ci95"][0] <= 1.0 <= sp["ci95"][1]:
            break
    assert sp["ci95"][0] <= 1.0 <= sp["ci95"][1], sp
    assert result.report.steps[0].modified is False


def test_report_has_the_public_json_shape():
    _, result = run("identity,prune-magnitude{sparsity=0.3}", max_accuracy_drop=0.5)
    d = result.report.to_dict()
    assert d["schema"] == "optistack.report/1" and d["pipeline"] == "identity,prune-magnitude{sparsity=0.3}"
    assert {"latency_ms", "accuracy"} <= set(d["baseline"])
    step = d["steps"][1]
    for key in ("pass", "config", "status", "speedup", "cumulative_speedup", "latency_ms", "accuracy",
                "peak_memory_bytes", "model_bytes", "reason"):
        assert key in step
    assert step["config"] == {"sparsity": 0.3, "scope": "layer", "skip": "lm_head|embed"}
    assert set(step["accuracy"]) >= {"metric", "before", "after", "delta", "higher_is_better"}
    assert step["accuracy"]["metric"] == "rel_error" and step["accuracy"]["higher_is_better"] is False
    assert set(step["latency_ms"]) >= {"median", "p90", "p99"}
    assert len(step["speedup"]["ci95"]) == 2


def test_eval_fn_needs_a_direction():
    with pytest.raises(ost.WorkloadError, match="higher_is_better"):
        ost.optimize(mlp(), torch.randn(4, 256), "identity", eval_fn=lambda m: 1.0, verbose=False)


def test_eval_fn_scores_are_gated_in_their_direction():
    x = torch.randn(64, 256)
    ref = mlp()(x).detach()

    def closeness(m):  # higher is better
        with torch.no_grad():
            return float(1.0 / (1.0 + (m(x) - ref).abs().mean()))

    _, result = run("test-wreck", eval_fn=closeness, higher_is_better=True, max_accuracy_drop=0.1)
    assert statuses(result) == [("test-wreck", "rejected")]
    assert result.report.steps[0].accuracy.metric == "eval"
