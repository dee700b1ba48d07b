"""optimize() checks its inputs before anything runs, and hands the caller's model back exactly as it was."""
import hashlib

import pytest
import torch

import optistack as ost
from optistack.bench.timer import TimingConfig
from optistack.core.errors import OptistackError, PipelineParseError

FAST = TimingConfig(warmup=1, min_rounds=4, max_rounds=6, max_seconds=3)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 32)
        self.drop = torch.nn.Dropout(0.1)
        self.norm = torch.nn.BatchNorm1d(32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(self.norm(self.drop(self.a(x))))


def checksum(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def optimize(model, x, pipeline="identity", **kw):
    return ost.optimize(model, x, pipeline, timing=FAST, verbose=False, **kw)


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_pipeline_is_one_clear_error(text):
    with pytest.raises(PipelineParseError, match="pipeline is empty"):
        optimize(Net().eval(), torch.randn(4, 16), text)


def test_a_pipeline_object_with_no_passes_is_refused():
    with pytest.raises(PipelineParseError, match="no passes"):
        optimize(Net().eval(), torch.randn(4, 16), ost.Pipeline([]))


def test_a_model_on_the_meta_device_is_one_clear_error():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(OptistackError, match="meta device.*'a.weight'"):
        optimize(model, torch.randn(4, 16))


@pytest.mark.parametrize("bad, what", [
    (torch.empty(4, 16, device="meta"), "meta device"),
    ((torch.empty(4, 16, device="meta"),), "meta device"),
    ({"x": torch.empty(4, 16, device="meta")}, "meta device"),
    (torch.randn(0, 16), "empty tensor"),
    ((torch.randn(0, 16),), "empty tensor"),
    (torch.randn(4, 0), "empty tensor"),
    ((), "is empty"),
    ([], "is empty"),
    ({}, "is empty"),
    (None, "is None"),
])
def test_bad_inputs_are_one_clear_error_and_the_model_is_untouched(bad, what):
    model = Net().train()
    before = checksum(model)
    with pytest.raises(OptistackError, match=what):
        optimize(model, bad)
    assert checksum(model) == before and model.training


def test_empty_eval_inputs_are_refused():
    with pytest.raises(OptistackError, match=r"eval_inputs\[1\].*empty tensor"):
        optimize(Net().eval(), torch.randn(4, 16), eval_inputs=[torch.randn(4, 16), torch.randn(0, 16)])


def test_the_callers_model_comes_back_exactly_as_it_was():
    model = Net().train()
    model.norm.eval()  # a mix of modes, which .train()/.eval() on the root would flatten
    model.a.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = checksum(model)
    result = optimize(model, torch.randn(8, 16), "identity,prune-magnitude{sparsity=0.3}")
    assert [s.status for s in result.report.steps] == ["applied", "applied"]
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert checksum(model) == before
    assert not result.model.training  # the optimized copy is for inference


def test_the_callers_mode_is_restored_when_the_run_raises():
    model = Net().train()
    with pytest.raises(ost.WorkloadError):  # eval_fn without a direction, refused while building the workload
        optimize(model, torch.randn(4, 16), eval_fn=lambda m: 1.0)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("kw, what", [
    ({"max_accuracy_drop": "0.1"}, "max_accuracy_drop must be a number"),
    ({"max_accuracy_drop": True}, "max_accuracy_drop must be a number"),
    ({"max_accuracy_drop": float("nan")}, "max_accuracy_drop must be a number"),
    ({"max_accuracy_drop": -0.5}, "max_accuracy_drop must be a number"),
    ({"timing": "fast"}, "timing must be an optistack.TimingConfig"),
])
def test_a_bad_budget_or_timing_is_one_clear_error(kw, what):
    with pytest.raises(OptistackError, match=what):
        ost.optimize(Net().eval(), torch.randn(4, 16), "identity", verbose=False, **kw)


def test_an_original_that_already_outputs_nan_is_one_clear_error():
    with pytest.raises(OptistackError, match="original model's outputs .* not finite"):
        optimize(Net().eval(), torch.full((4, 16), float("nan")))


@pytest.mark.parametrize("budget", ["0.1", True, float("nan"), -0.5])
def test_a_bad_budget_is_one_error_type_from_every_entry_point(budget, tmp_path, capsys):
    """run, optimize, search, a GateInstrument and the CLI all refuse it with BudgetError, the same words."""
    from optistack.bench.gate import GateInstrument
    from optistack.cli import main
    from optistack.core.errors import BudgetError
    from optistack.workloads.generic import GenericWorkload

    net, x = Net().eval(), torch.randn(4, 16)
    calls = {
        "optimize": lambda: ost.optimize(net, x, "identity", verbose=False, max_accuracy_drop=budget),
        "Pipeline.run": lambda: ost.Pipeline.parse("identity").run(GenericWorkload(net, x), max_accuracy_drop=budget),
        "search": lambda: ost.search(GenericWorkload(net, x), ["identity"], max_accuracy_drop=budget,
                                     store=tmp_path / "s.db", verbose=False),
        "GateInstrument": lambda: GateInstrument(budget),
    }
    for where, call in calls.items():
        with pytest.raises(BudgetError, match=r"max_accuracy_drop must be a number >= 0"):
            call()
    if isinstance(budget, float):  # the CLI's flag is a float: the same check, one line, exit 2, no model loaded
        assert main(["run", "--model", "nosuchmodel", "--pipeline", "identity", "--max-accuracy-drop", str(budget)]) == 2
        assert "max_accuracy_drop must be a number >= 0" in capsys.readouterr().err


def test_the_cli_and_optimize_go_straight_to_the_wiring(monkeypatch):
    """One entry path: cli / api -> wiring.run_pipeline -> Runner, never back through core's installed default."""
    import optistack.core.run as core_run

    monkeypatch.setattr(core_run, "_default_wiring", None)  # Pipeline.run would now raise
    result = ost.optimize(Net().eval(), torch.randn(4, 16), "identity", verbose=False)
    assert [s.status for s in result.report.steps] == ["applied"] and result.workload is not None
