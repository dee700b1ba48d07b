"""`pt2e-int8`: config and forms (fast); tiny BERT through export, the x86 quantizer and Inductor (slow:
torch.compile), with the oneDNN int8 kernels named in the report; MiniLM keeps cosine >= 0.99."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert

import optistack as ost
from optistack.core.errors import PassApplyError, PassConfigError, PipelineParseError
from optistack.core.pass_protocol import COMPILED, MODULE, PassContext
from optistack.passes.quant.pt2e_int8 import Pt2eInt8Pass, kernel_counts
from optistack.workloads.generic import GenericWorkload

pytest.importorskip("torchao")
# int8 static of a random 2-layer BERT: measured ~4e-4 relative error of the hidden states; the floor
# leaves room for other CPUs while catching a broken graph (errors of order 1).
REL_ERROR_FLOOR = 0.02
MINILM_COSINE_FLOOR = 0.99  # the bar


@pytest.fixture(scope="module")
def bert_workload():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return GenericWorkload(tiny_bert(), ((), {"input_ids": ids, "attention_mask": mask}))


def test_config_forms_and_kernel_counting():
    assert Pt2eInt8Pass.takes == frozenset({MODULE}) and Pt2eInt8Pass.gives == COMPILED
    with pytest.raises(PassConfigError, match="calib_batches"):
        Pt2eInt8Pass(calib_batches=0)
    with pytest.raises(PassConfigError, match="mode"):
        Pt2eInt8Pass(mode="weight-only")
    with pytest.raises(PipelineParseError):
        ost.Pipeline.parse("pt2e-int8,int8-dynamic")  # the result is compiled: no weight edits after it
    code = ("cpp_fused_add_0 = async_compile.cpp_pybinding(...)\ncpp_fused_gelu_1 = async_compile.cpp_pybinding(...)\n"
            "buf1 = torch.ops.onednn.qlinear_pointwise.tensor(x)\nbuf2 = torch.ops.onednn.qlinear_pointwise.tensor(y)\n"
            "buf3 = torch.ops.aten.empty_strided(z)")
    assert kernel_counts([code]) == ({"onednn.qlinear_pointwise.tensor": 2}, 2)


def _rel_error(model, workload) -> float:
    kwargs = workload.inputs[1]
    with torch.inference_mode():
        ref = workload.model(**kwargs).last_hidden_state
        got = model(**kwargs).last_hidden_state
    assert got.dtype == torch.float32
    return float((got - ref).norm() / ref.norm())


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"mixed": "bf16"}, {"mode": "dynamic"}], ids=["static", "bf16", "dynamic"])
def test_int8_kernels_run_and_outputs_stay_close(bert_workload, options):
    before = {k: v.clone() for k, v in bert_workload.model.state_dict().items()}
    result = Pt2eInt8Pass(**options).apply(bert_workload.model, PassContext(workload=bert_workload))
    info = result.info
    assert info["int8_weights"] == 13  # 2 layers x (q, k, v, attn out, ffn in, ffn out) + pooler
    assert info["int8_kernel_calls"] >= 12 and "onednn.qlinear_pointwise" in info["kernels"]
    assert _rel_error(result.model, bert_workload) < REL_ERROR_FLOOR
    after = bert_workload.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched


@pytest.mark.slow
def test_a_model_without_linear_layers_is_refused():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (4,)) * 2

    workload = GenericWorkload(NoLinear(), (torch.randn(2, 4),))
    with pytest.raises(PassApplyError, match="annotated no layer"):
        Pt2eInt8Pass().apply(workload.model, PassContext(workload=workload))


@pytest.mark.slow
def test_minilm_keeps_cosine():
    workload = ost.workloads.load("minilm")
    model = Pt2eInt8Pass(mixed="bf16").apply(workload.model, PassContext(workload=workload)).model
    scores = workload.evaluate(model)
    assert scores["cosine"] >= MINILM_COSINE_FLOOR, scores
