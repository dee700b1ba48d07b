"""Bad input to `optimize()` and `Pipeline.parse`: each is one clear OptistackError (one line, naming the
problem), raised before anything runs, and the caller's model is left exactly as it was."""
from __future__ import annotations

import pytest
import torch
from robust_helpers import QUICK, assert_unchanged, one_clear_error, snapshot
from torch import nn

import optistack as ost


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


X = torch.randn(4, 16)


class NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x) * float("nan")


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        raise RuntimeError("boom from the user's forward")


class Hello:  # not a module, not callable with tensors
    pass


# id -> (model factory, example inputs factory, pipeline, words the message must contain (any case))
BAD_CALLS = {
    "meta-model": (lambda: _mlp().to("meta"), lambda: X, "int8-dynamic", ("meta",)),
    "meta-inputs": (_mlp, lambda: torch.empty(4, 16, device="meta"), "int8-dynamic", ("meta",)),
    "meta-inputs-in-dict": (_mlp, lambda: {"input": torch.empty(4, 16, device="meta")}, "int8-dynamic", ("meta",)),
    "empty-batch": (_mlp, lambda: torch.empty(0, 16), "int8-dynamic", ("empty",)),
    "empty-tuple": (_mlp, lambda: (), "int8-dynamic", ("empty",)),
    "empty-dict": (_mlp, dict, "int8-dynamic", ("empty",)),
    "none-inputs": (_mlp, lambda: None, "int8-dynamic", ("none",)),
    "string-model": (lambda: "llama", lambda: X, "int8-dynamic", ("model",)),
    "none-model": (lambda: None, lambda: X, "int8-dynamic", ("model",)),
    "object-model": (Hello, lambda: X, "int8-dynamic", ("model",)),
    "dict-non-tensor-values": (_mlp, lambda: {"x": "not a tensor", "y": 3}, "int8-dynamic", ()),
    "wrong-shape-inputs": (_mlp, lambda: torch.randn(4, 5), "int8-dynamic", ()),
    "int-pipeline": (_mlp, lambda: X, 42, ("pipeline",)),
    "none-pipeline": (_mlp, lambda: X, None, ("pipeline",)),
    "list-pipeline": (_mlp, lambda: X, ["int8-dynamic"], ()),
    "nan-model": (NaNModel, lambda: X, "int8-dynamic", ("finite",)),
    "nan-inputs": (_mlp, lambda: torch.full((4, 16), float("nan")), "int8-dynamic", ()),
    "forward-raises": (Raises, lambda: X, "int8-dynamic", ()),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_is_one_clear_error_and_model_untouched(case):
    make_model, make_inputs, pipeline, words = BAD_CALLS[case]
    model = make_model()
    before = snapshot(model) if isinstance(model, nn.Module) and case != "meta-model" else None
    with pytest.raises(Exception) as excinfo:
        ost.optimize(model, make_inputs(), pipeline, timing=QUICK, verbose=False)
    one_clear_error(excinfo, *words)
    if before is not None:
        assert_unchanged(model, before)


BAD_PIPELINES = {
    "empty": ("", ("empty",)),
    "spaces": ("   ", ("empty",)),
    "tabs-newlines": ("\t\n  \n", ("empty",)),
    "lone-comma": (",", ()),
    "commas": (" , , ", ()),
    "trailing-comma": ("int8-dynamic,", ()),
    "negative-group-size": ("rtn-int4{group_size=-1}", ("group_size",)),
    "zero-group-size": ("rtn-int4{group_size=0}", ("group_size",)),
    "huge-group-size": ("rtn-int4{group_size=99999999999999999999999}", ("group_size",)),
    "sparsity-over-one": ("prune-magnitude{sparsity=1.5}", ("sparsity",)),
    "sparsity-negative": ("prune-magnitude{sparsity=-0.1}", ("sparsity",)),
    "sparsity-nan": ("prune-magnitude{sparsity=nan}", ("sparsity",)),
    "sparsity-string": ("prune-magnitude{sparsity=lots}", ("sparsity",)),
    "unknown-option": ("int8-dynamic{frobnicate=1}", ("frobnicate",)),
    "unknown-pass": ("int9-dynamic", ("int9-dynamic",)),
    "unterminated-brace": ("awq{", ()),
    "unterminated-option": ("rtn-int4{group_size=32", ()),
    "stray-close-brace": ("rtn-int4}", ()),
    "nested-braces": ("rtn-int4{group_size={32}}", ()),
    "empty-option-name": ("rtn-int4{=32}", ()),
    "duplicate-option": ("rtn-int4{group_size=32,group_size=64}", ("group_size",)),
    "unterminated-quote": ('fp8{skip="lm_head}', ()),
    "unicode-junk": ("int8-dynamic\u202e,\u0000\U0001f4a5", ()),
    "unicode-pass": ("ïnt8-dynamic", ()),
    "no-such-preset": ("@no-such-preset", ("no-such-preset",)),
    "bare-at": ("@", ()),
    "compile-then-int8": ("compile,int8-dynamic", ("int8-dynamic",)),
    "cast-bad-dtype": ("cast{dtype=int3}", ("dtype",)),
    "very-long": ("int8-dynamic," * 5000 + "x" * 10000, ()),
}


EMPTY_TEXT = {"empty", "spaces", "tabs-newlines"}


@pytest.mark.parametrize("case", sorted(set(BAD_PIPELINES) - EMPTY_TEXT))
def test_bad_pipeline_text_is_one_clear_error(case):
    text, words = BAD_PIPELINES[case]
    with pytest.raises(Exception) as excinfo:
        ost.Pipeline.parse(text)
    one_clear_error(excinfo, *words)


@pytest.mark.parametrize("case", sorted(EMPTY_TEXT))
def test_empty_pipeline_text_is_refused_when_run(case):
    """Parsing empty text gives an empty pipeline; running it is refused with one clear error."""
    from optistack.workloads.generic import GenericWorkload

    pipe = ost.Pipeline.parse(BAD_PIPELINES[case][0])
    with pytest.raises(Exception) as excinfo:
        pipe.run(GenericWorkload(_mlp(), X), timing=QUICK, verbose=False)
    one_clear_error(excinfo, "pipeline")


@pytest.mark.parametrize("case", ["empty", "spaces", "negative-group-size", "sparsity-over-one", "unknown-option",
                                  "unterminated-brace", "no-such-preset", "compile-then-int8", "unicode-junk"])
def test_bad_pipeline_text_through_optimize(case):
    text, words = BAD_PIPELINES[case]
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(Exception) as excinfo:
        ost.optimize(model, X, text, timing=QUICK, verbose=False)
    one_clear_error(excinfo, *words)
    assert_unchanged(model, before)


BAD_RUN_OPTIONS = {
    "negative-budget": {"max_accuracy_drop": -0.5},
    "string-budget": {"max_accuracy_drop": "1%"},
    "nan-budget": {"max_accuracy_drop": float("nan")},
    "timing-dict": {"timing": {"min_rounds": 3}},
    "timing-int": {"timing": 3},
    "eval-inputs-empty-batch": {"eval_inputs": [torch.empty(0, 16)]},
    "eval-inputs-meta": {"eval_inputs": [torch.empty(4, 16, device="meta")]},
    "eval-fn-not-callable": {"eval_fn": 3, "higher_is_better": True},
}


@pytest.mark.parametrize("case", list(BAD_RUN_OPTIONS))
def test_bad_run_option_is_one_clear_error(case):
    model = _mlp()
    before = snapshot(model)
    kwargs = {"timing": QUICK, **BAD_RUN_OPTIONS[case]}
    with pytest.raises(Exception) as excinfo:
        ost.optimize(model, X, "int8-dynamic", verbose=False, **kwargs)
    one_clear_error(excinfo)
    assert_unchanged(model, before)


def test_training_mode_model_comes_back_in_training_mode():
    model = _mlp().train()
    model[0].eval()  # mixed modes must come back exactly
    model[2].weight.requires_grad_(False)
    before = snapshot(model)
    result = ost.optimize(model, X, "int8-dynamic", timing=QUICK, verbose=False)
    assert result.report.steps[0].status in {"applied", "skipped", "rejected", "failed"}
    assert_unchanged(model, before)
