"""Every weight pass on every tiny architecture, through the runner: each step ends applied with close
outputs (and a model no bigger than before), or skipped / unchanged with the reason; never a failure.

The runner runs without instruments (no timing: that is the benchmark's own tests' business), and
the outputs are scored here by the workload's relative output error, on every example input.

Architectures (tests/tiny_models.py): Llama, BERT, GPT-2 (Conv1D, tied head), GPT-NeoX, Phi-3 (fused
projections), T5 (reads `wo.weight.dtype` in its forward), OPT and a CNN. Random weights: the error
floors bound what a pass may cost on them, they are not accuracy claims.
"""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHITECTURES

from optistack.bench.memory import model_bytes
from optistack.core.pipeline import Pipeline
from optistack.workloads.generic import GenericWorkload

# pass text -> largest relative output error (vs the float model) an applied step may have
PASSES = {
    "int8-dynamic": 0.06,
    "int8-weight": 0.06,
    "fp8": 0.1,
    "rtn-int4{group_size=32}": 0.3,
    "awq{group_size=32,calib_samples=4,calib_seq_len=16,search_samples=2,n_grid=4,clip=false}": 0.3,
    "prune-magnitude": 0.6,
    "prune-wanda{calib_samples=4}": 0.6,
    "prune-2:4{calib_samples=4}": 0.7,
    "prune-structured": 0.6,
    "fuse-kernels{backend=torch}": 1e-4,
}
# Must apply (a regression, not a refusal, if they do not): every linear-layer pass on every model
# with linear layers; awq where the mapping table knows the architecture; prune-structured on each MLP.
MUST_APPLY = {
    "awq": {"llama", "gpt2", "gpt-neox", "phi3", "opt"},
    "fuse-kernels": {"llama", "phi3"},
}


_CACHE: dict[str, tuple] = {}


def _run(arch: str, text: str):
    """(original model, result, the step, relative output error of the result)."""
    if arch not in _CACHE:
        build, inputs = ARCHITECTURES[arch]
        model, batches = build(), inputs()
        _CACHE[arch] = model, GenericWorkload(model, batches[0], eval_inputs=batches[1:])
    model, workload = _CACHE[arch]
    result = Pipeline.parse(text).run(workload, instruments=[], verbose=False)
    err = workload.evaluate(result.model)["rel_error"]
    return model, result, result.report.steps[0], err


@pytest.mark.parametrize("text", list(PASSES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pass_applies_with_close_outputs_or_says_why_not(arch, text):
    model, result, step, err = _run(arch, text)
    name = step.pass_name
    if step.status == "failed":
        pytest.fail(f"{arch} {text}: failed: {step.reason}")
    if step.status in ("skipped", "rejected"):
        assert step.reason, f"{arch} {text}: {step.status} without a reason"
        assert arch not in MUST_APPLY.get(name, set(ARCHITECTURES)), f"{arch} {text}: {step.reason}"
        return
    assert step.status == "applied"
    if not step.modified:  # a runner that counts an unchanged step as applied: the pass must still say why
        assert str(step.info.get("reason", "")).startswith(("nothing to change", "not supported")), step.info
        assert arch not in MUST_APPLY.get(name, set(ARCHITECTURES)), f"{arch} {text}: {step.info['reason']}"
        return
    assert math.isfinite(err) and err <= PASSES[text], f"{arch} {text}: relative error {err:.4f}"
    assert model_bytes(result.model) <= model_bytes(model), f"{arch} {text}: the model grew"


@pytest.mark.parametrize("text", ["int8-dynamic", "int8-weight{min_features=1}", "fp8{skip=\"\"}",
                                  "rtn-int4{skip=\"\",group_size=32}"])
def test_tied_head_is_left_alone_and_nothing_grows(text):
    """GPT-2's lm_head shares the embedding: quantizing it alone would store a second copy."""
    model, result, step, _ = _run("gpt2", text)
    assert step.status == "applied" and step.modified
    assert step.info["linears_tied_left"] == 1 and "lm_head" in step.info["tied_reason"]
    if not text.startswith("rtn-int4"):  # rtn-int4/awq hand the head to their own `head=` option (head.py)
        head = result.model.lm_head
        assert type(head) is torch.nn.Linear and head.weight is result.model.transformer.wte.weight
    assert step.info["conv1d_converted"] == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
    assert model_bytes(result.model) < 0.5 * model_bytes(model)
