"""The part every training callback shares: options are checked up front, the trained model is left
as it was, and the report becomes flat finite numbers a logger accepts."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from optistack.bench.timer import TimingConfig
from optistack.core.errors import OptistackError, UnknownPassError
from optistack.integrations.trained_model import TrainedModelOptimizer, report_metrics
from optistack.workloads.generic import GenericWorkload

FAST = TimingConfig(warmup=1, min_rounds=3, max_rounds=3, max_seconds=1.0)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


@pytest.mark.parametrize("kwargs, words", [
    ({}, "neither"),
    ({"example_inputs": torch.randn(2, 16), "workload": lambda m: m}, "both"),
    ({"workload": "generic"}, "callable"),
    ({"example_inputs": torch.randn(2, 16), "when": "epoch_end"}, "'train_end', 'evaluate'"),
    ({"example_inputs": torch.randn(2, 16), "prefix": ""}, "prefix"),
])
def test_bad_options_raise_one_clear_error(kwargs, words):
    with pytest.raises(OptistackError, match=words):
        TrainedModelOptimizer("int8-dynamic", **kwargs)


def test_a_pipeline_typo_fails_before_training():
    with pytest.raises(UnknownPassError):
        TrainedModelOptimizer("int8-dynamc", example_inputs=torch.randn(2, 16))


def test_run_leaves_the_trained_model_as_it_was_and_logs_finite_figures(tmp_path):
    model = mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 16)).sum().backward()  # a model mid-training: grads present, train mode
    runner = TrainedModelOptimizer("identity,int8-dynamic", example_inputs=torch.randn(8, 16), timing=FAST,
                                   save_report=tmp_path / "report-{step}.json", verbose=False)
    metrics = runner.run(model, step=7)

    assert model.training and all(p.requires_grad and p.grad is not None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [s.status for s in runner.report.steps] == ["applied", "applied"]
    assert runner.history == [(7, runner.report)] and runner.result.model is not model
    assert (tmp_path / "report-7.json").is_file()

    for key in ("speedup", "latency_ms", "baseline_latency_ms", "model_bytes", "baseline_model_bytes",
                "accuracy", "baseline_accuracy", "accuracy_delta", "passes_applied",
                "1-identity/speedup", "2-int8-dynamic/applied", "2-int8-dynamic/accuracy_delta",
                "2-int8-dynamic/model_bytes", "2-int8-dynamic/latency_ms"):
        assert f"optistack/{key}" in metrics, key
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["optistack/passes_applied"] == 2.0
    assert metrics["optistack/speedup"] == runner.report.final_speedup
    # int8 weights: the model shrinks, and the output error (lower is better) rises from 0
    assert metrics["optistack/model_bytes"] < metrics["optistack/baseline_model_bytes"]
    assert metrics["optistack/accuracy_delta"] > 0


def test_a_workload_factory_gets_the_copy_and_a_rejected_step_logs_applied_zero():
    seen = []

    def factory(model):
        seen.append(model)
        return GenericWorkload(model, torch.randn(4, 16))

    model = mlp()
    runner = TrainedModelOptimizer("prune-magnitude{sparsity=0.9}", workload=factory, max_accuracy_drop=1e-6,
                                   timing=FAST, prefix="opt", verbose=False)
    metrics = runner.run(model, step=1)
    assert len(seen) == 1 and seen[0] is not model and not seen[0].training
    assert runner.report.steps[0].status == "rejected"
    assert metrics["opt/1-prune-magnitude/applied"] == 0.0
    assert metrics["opt/passes_applied"] == 0.0 and metrics["opt/accuracy_delta"] == 0.0
    assert not any(k.startswith("optistack/") for k in metrics)


def test_report_metrics_leaves_out_missing_values():
    from optistack.bench.report import Report, Step

    report = Report(workload={}, pipeline="compile", machine={}, versions={}, baseline={},
                    steps=[Step(pass_name="compile", config={}, text="compile", status="skipped",
                                reason="no compiler")])
    assert report_metrics(report) == {"optistack/speedup": 1.0, "optistack/passes_applied": 0.0,
                                      "optistack/1-compile/applied": 0.0}


def test_importing_the_integrations_package_imports_no_framework():
    code = ("import sys, optistack, optistack.integrations, optistack.integrations.trained_model;"
            "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
