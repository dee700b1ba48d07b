"""The runner decides every step's outcome; the gate is its own instrument, on even without the benchmark."""
import io
import json

import pytest
import torch

import optistack as ost
from optistack.bench.benchmark import BenchmarkInstrument
from optistack.bench.gate import GateInstrument
from optistack.bench.progress import ProgressInstrument
from optistack.bench.timer import TimingConfig
from optistack.core.errors import PreconditionError
from optistack.core.outcome import Reject
from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import register_pass, unregister_pass
from optistack.workloads.generic import GenericWorkload

FAST = TimingConfig(warmup=1, min_rounds=4, max_rounds=6, max_seconds=3)


class MakeNaN(ConfiguredPass):
    name = "test-outcome-nan"

    def apply(self, model, ctx):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return PassResult(model)


class Scale(ConfiguredPass):
    name = "test-outcome-scale"

    def apply(self, model, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        return PassResult(model)


class NoChange(ConfiguredPass):
    name = "test-outcome-nochange"

    def apply(self, model, ctx):
        return PassResult(model, modified=False, info={"reason": "no layer of a kind this pass handles"})


class Silent(ConfiguredPass):
    name = "test-outcome-silent"

    def apply(self, model, ctx):
        return PassResult(model, modified=False)


class WrongKind(ConfiguredPass):
    name = "test-outcome-wrongkind"

    def apply(self, model, ctx):
        raise PreconditionError("test-outcome-wrongkind: serves causal-lm workloads; this one is generic")


class Explode(ConfiguredPass):
    name = "test-outcome-explode"

    def apply(self, model, ctx):
        return _deep_helper(model)


def _deep_helper(model):
    raise ValueError("layer 3 has an odd shape")


PASSES = (MakeNaN, Scale, NoChange, Silent, WrongKind, Explode)


@pytest.fixture(scope="module", autouse=True)
def registered():
    for cls in PASSES:
        register_pass(cls)
    yield
    for cls in PASSES:
        unregister_pass(cls.name)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()


def run(pipeline, **kw):
    kw.setdefault("timing", FAST)
    kw.setdefault("verbose", False)
    return ost.optimize(mlp(), torch.randn(16, 32), pipeline, **kw)


def statuses(result):
    return [(s.pass_name, s.status) for s in result.report.steps]


def test_gate_rejects_nan_when_only_a_progress_instrument_runs():
    stream = io.StringIO()
    model, x = mlp(), torch.randn(16, 32)
    wl = GenericWorkload(model, x)
    result = ost.Pipeline.parse("test-outcome-nan,identity").run(wl, instruments=[ProgressInstrument(stream)])
    assert statuses(result) == [("test-outcome-nan", "rejected"), ("identity", "applied")]
    assert "finite" in result.report.steps[0].reason
    assert torch.isfinite(result.model(x)).all()
    # progress prints the runner's verdict, not a status an instrument guessed before the gate spoke
    assert "test-outcome-nan: rejected" in stream.getvalue()


def test_gate_enforces_the_budget_without_the_benchmark():
    wl = GenericWorkload(mlp(), torch.randn(16, 32))
    result = ost.Pipeline.parse("test-outcome-scale").run(wl, max_accuracy_drop=0.01, instruments=[])
    assert statuses(result) == [("test-outcome-scale", "rejected")]
    assert "exceeds the budget" in result.report.steps[0].reason


def test_a_gate_passed_by_the_caller_is_used_and_runs_last():
    seen = []

    class Spy:
        def after_pass(self, p, step, candidate, state):
            seen.append("spy")

    class LoudGate(GateInstrument):
        def after_pass(self, p, step, candidate, state):
            seen.append("gate")
            super().after_pass(p, step, candidate, state)

    wl = GenericWorkload(mlp(), torch.randn(16, 32))
    result = ost.Pipeline.parse("test-outcome-scale").run(wl, instruments=[LoudGate(0.01), Spy()])
    assert seen == ["spy", "gate"] and statuses(result) == [("test-outcome-scale", "rejected")]
    assert result.report.max_accuracy_drop == 0.01  # the report states the budget the gate used


def test_an_instrument_rejects_by_raising_and_the_runner_decides():
    class Veto:
        def after_pass(self, p, step, candidate, state):
            assert step.status != "rejected"  # nobody wrote a verdict before the runner
            raise Reject("too big for the device")

    wl = GenericWorkload(mlp(), torch.randn(16, 32))
    result = ost.Pipeline.parse("test-outcome-scale,identity").run(wl, instruments=[Veto()])
    assert statuses(result)[0] == ("test-outcome-scale", "rejected")
    assert result.report.steps[0].reason == "too big for the device"


def test_nothing_changed_is_skipped_with_the_reason_and_not_counted_as_applied():
    result = run("test-outcome-nochange,test-outcome-silent,prune-magnitude{sparsity=0.2}")
    steps = result.report.steps
    assert [s.status for s in steps] == ["skipped", "skipped", "applied"]
    assert steps[0].reason == "no layer of a kind this pass handles"
    assert steps[1].reason == "nothing to change"
    assert steps[0].speedup is None and steps[0].modified is False  # not measured
    assert "1 of 3 passes applied" in str(result.report)


def test_identity_is_a_control_measured_although_it_changes_nothing():
    result = run("identity")
    step = result.report.steps[0]
    assert step.status == "applied" and step.modified is False and step.speedup is not None


def test_a_precondition_on_the_workload_skips_not_fails():
    result = run("test-outcome-wrongkind,identity")
    assert statuses(result) == [("test-outcome-wrongkind", "skipped"), ("identity", "applied")]
    assert "serves causal-lm workloads" in result.report.steps[0].reason
    assert result.report.steps[0].traceback is None


def test_a_failed_step_keeps_type_message_and_traceback_in_the_json():
    result = run("test-outcome-explode")
    step = json.loads(result.report.to_json())["steps"][0]
    assert step["status"] == "failed" and step["reason"] == "ValueError: layer 3 has an odd shape"
    trace = step["traceback"]
    assert trace.startswith("Traceback") and "_deep_helper" in trace
    assert "ValueError: layer 3 has an odd shape" in trace.splitlines()[-1]
    again = ost.Report.from_dict(json.loads(result.report.to_json()))
    assert again.steps[0].traceback == trace
    md = result.report.to_markdown()
    assert "<details>" in md and "_deep_helper" in md


def test_benchmark_budget_argument_is_deprecated_but_still_gates():
    wl = GenericWorkload(mlp(), torch.randn(16, 32))
    with pytest.warns(DeprecationWarning, match="gate"):
        bench = BenchmarkInstrument(max_accuracy_drop=0.01, timing=FAST)
    result = ost.Pipeline.parse("test-outcome-scale").run(wl, instruments=[bench])
    assert statuses(result) == [("test-outcome-scale", "rejected")]
    assert result.report.steps[0].speedup is not None  # measured before the gate refused it


def test_old_instrument_module_path_warns():
    import importlib
    import sys

    sys.modules.pop("optistack.bench.instrument", None)
    with pytest.warns(DeprecationWarning, match="bench.benchmark"):
        module = importlib.import_module("optistack.bench.instrument")
    assert module.BenchmarkInstrument is BenchmarkInstrument


class MutateCompiledThenRaise(ConfiguredPass):
    """A third-party pass that edits the compiled model it is handed in place, then fails."""

    name = "test-outcome-mutate-compiled"
    takes = frozenset({"module", "compiled"})

    def apply(self, model, ctx):
        inner = getattr(model, "_orig_mod", model)
        with torch.no_grad():
            for p in inner.parameters():
                p.zero_()
        raise RuntimeError("gave up half way")


@pytest.mark.slow  # torch.compile (eager backend)
def test_a_pass_that_corrupts_a_compiled_model_and_raises_leaves_the_kept_model_intact():
    register_pass(MutateCompiledThenRaise)
    try:
        x = torch.randn(16, 32)
        model = mlp()
        expected = model(x).detach()
        result = run("compile{backend=eager},test-outcome-mutate-compiled,identity", max_accuracy_drop=0.01)
        assert statuses(result) == [("compile", "applied"), ("test-outcome-mutate-compiled", "failed"),
                                    ("identity", "applied")]
        assert type(result.model).__name__ == "OptimizedModule"
        torch.testing.assert_close(result.model(x), expected)  # the failed pass's edits did not leak
    finally:
        unregister_pass(MutateCompiledThenRaise.name)


def test_two_different_budgets_are_refused():
    wl = GenericWorkload(mlp(), torch.randn(16, 32))
    with pytest.raises(ost.OptistackError, match="two accuracy budgets"):
        ost.Pipeline.parse("identity").run(wl, max_accuracy_drop=0.1, instruments=[GateInstrument(0.01)])


class ReturnsBareModel(ConfiguredPass):
    name = "test-outcome-bare"

    def apply(self, model, ctx):
        return model  # not a PassResult


class BrokenRequirements(ConfiguredPass):
    name = "test-outcome-broken-req"

    def requirements(self):
        raise ImportError("plugin half installed")

    def apply(self, model, ctx):
        return PassResult(model)


def test_a_pass_breaking_its_contract_fails_its_step_not_the_run():
    for cls in (ReturnsBareModel, BrokenRequirements):
        register_pass(cls)
    try:
        result = run("test-outcome-bare,test-outcome-broken-req,identity")
    finally:
        for cls in (ReturnsBareModel, BrokenRequirements):
            unregister_pass(cls.name)
    assert [s.status for s in result.report.steps] == ["failed", "failed", "applied"]
    assert "must return PassResult" in result.report.steps[0].reason
    assert result.report.steps[1].reason == "ImportError: plugin half installed"


def test_an_old_style_instrument_that_flips_the_status_still_rejects_with_a_warning():
    class OldVeto:
        def after_pass(self, p, step, candidate, state):
            step.status, step.reason = "rejected", "old-style veto"

    wl = GenericWorkload(mlp(), torch.randn(16, 32))
    with pytest.warns(DeprecationWarning, match="Reject"):
        result = ost.Pipeline.parse("test-outcome-scale").run(wl, instruments=[OldVeto()])
    assert statuses(result) == [("test-outcome-scale", "rejected")]
    assert result.report.steps[0].reason == "old-style veto"
