"""GenericWorkload on tiny modules: input forms, the declared direction, and relative output error."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from optistack.core.errors import WorkloadError
from optistack.core.modeling import flatten_outputs, normalize_inputs
from optistack.workloads import GenericWorkload, Metric, Workload


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, y=None):
        out = self.lin(x)
        return out if y is None else out + y


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return {"logits": h, "aux": (h.sum(-1), None)}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoInputs()


def test_input_forms_are_normalized_to_args_and_kwargs():
    x, y = torch.ones(2, 4), torch.zeros(2, 3)
    assert normalize_inputs(x) == ((x,), {})
    assert normalize_inputs((x, y)) == ((x, y), {})
    assert normalize_inputs([x]) == ((x,), {})
    assert normalize_inputs(((x,), {"y": y})) == ((x,), {"y": y})
    assert normalize_inputs({"x": x}) == ((), {"x": x})


def test_every_input_form_runs(model):
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    expected = model(x, y)
    for example in [(x, y), ((x,), {"y": y}), {"x": x, "y": y}]:
        assert torch.allclose(GenericWorkload(model, example).run(model), expected)
    assert GenericWorkload(model, x).run(model).shape == (2, 3)


def test_is_a_workload_with_rel_error_metric(model):
    wl = GenericWorkload(model, torch.randn(2, 4))
    assert isinstance(wl, Workload) and wl.kind == "generic" and wl.name == "generic"
    assert wl.metric == Metric("rel_error", higher_is_better=False, scale="absolute")
    assert wl.extra_measurements(model) == {}
    assert wl.describe()["params"] == 15


def test_eval_fn_needs_a_declared_direction(model):
    with pytest.raises(WorkloadError, match="higher_is_better"):
        GenericWorkload(model, torch.randn(2, 4), eval_fn=lambda m: 1.0)


def test_eval_fn_defines_the_metric(model):
    wl = GenericWorkload(model, torch.randn(2, 4), eval_fn=lambda m: 0.75, higher_is_better=True, metric_name="acc")
    assert wl.metric == Metric("acc", True, "relative")
    assert wl.evaluate(model) == {"acc": 0.75}
    unnamed = GenericWorkload(model, torch.randn(2, 4), eval_fn=lambda m: 2, higher_is_better=False)
    assert unnamed.evaluate(model) == {"eval": 2.0}


def test_rel_error_is_zero_for_the_original_and_grows_with_perturbation(model):
    wl = GenericWorkload(model, torch.randn(8, 4), eval_inputs=[torch.randn(3, 4), ((torch.randn(1, 4),), {})])
    assert wl.evaluate(model)["rel_error"] == 0.0
    small, large = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        small.lin.weight.add_(0.01)
        large.lin.weight.add_(0.5)
    e_small, e_large = wl.evaluate(small), wl.evaluate(large)
    assert 0 < e_small["rel_error"] < e_large["rel_error"]
    assert e_large["rel_error_max"] >= e_large["rel_error"]
    assert len(list(wl.calibration_inputs(10))) == 3 and len(list(wl.calibration_inputs(1))) == 1


def test_reference_is_taken_at_construction(model):
    wl = GenericWorkload(model, torch.randn(2, 4))
    with torch.no_grad():
        model.lin.bias.add_(1.0)  # a pass editing the original in place must not move the reference
    assert wl.evaluate(model)["rel_error"] > 0


def test_nan_outputs_give_nan(model):
    wl = GenericWorkload(model, torch.randn(2, 4))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lin.weight.fill_(math.nan)
    result = wl.evaluate(broken)
    assert math.isnan(result["rel_error"]) and math.isnan(result["rel_error_max"])
    assert wl.metric.drop(0.0, result["rel_error"]) == math.inf


def test_nested_and_low_precision_outputs_are_compared():
    torch.manual_seed(0)
    model = DictOut()
    wl = GenericWorkload(model, torch.randn(2, 4))
    assert flatten_outputs(model(torch.randn(2, 4))).shape == (8,)
    half = copy.deepcopy(model).to(torch.bfloat16)
    err = GenericWorkload(half, torch.randn(2, 4, dtype=torch.bfloat16)).evaluate(half)["rel_error"]
    assert err == 0.0
    assert 0 < wl.evaluate(lambda x: half(x.bfloat16()))["rel_error"] < 0.05


def test_callables_and_compiled_style_wrappers_work(model):
    wl = GenericWorkload(model, torch.randn(2, 4))
    assert wl.evaluate(lambda x: model(x))["rel_error"] == 0.0


def test_unusable_model_or_inputs_fail_with_the_reason(model):
    with pytest.raises(WorkloadError, match="must be callable"):
        GenericWorkload(42, torch.randn(2, 4))
    with pytest.raises(WorkloadError, match="example inputs failed.*RuntimeError"):
        GenericWorkload(model, torch.randn(2, 5))
    with pytest.raises(WorkloadError, match="eval_inputs must be a list"):
        GenericWorkload(model, torch.randn(2, 4), eval_inputs=torch.randn(2, 4))


def test_changed_output_size_is_an_error(model):
    wl = GenericWorkload(model, torch.randn(2, 4))
    with pytest.raises(WorkloadError, match="outputs have"):
        wl.evaluate(lambda x: model(x)[:, :2])
