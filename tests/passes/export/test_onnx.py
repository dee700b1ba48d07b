"""`onnx-export`, `ort-optimize`, `ort-quantize` on a tiny random BERT (fast; never an accuracy claim)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import tiny_bert  # noqa: E402

import optistack as ost  # noqa: E402
from optistack.bench.timer import TimingConfig  # noqa: E402
from optistack.core import registry  # noqa: E402
from optistack.core.errors import PassApplyError, PassConfigError, PipelineParseError  # noqa: E402
from optistack.core.pass_protocol import MODULE, ONNX, PassContext  # noqa: E402
from optistack.passes.export.onnx import OnnxExportPass  # noqa: E402
from optistack.passes.export.ort import OrtOptimizePass  # noqa: E402
from optistack.passes.export.ort_quantize import OrtQuantizePass  # noqa: E402
from optistack.passes.export.session import OrtModel  # noqa: E402
from optistack.workloads.generic import GenericWorkload  # noqa: E402

QUICK = TimingConfig(warmup=1, min_rounds=3, max_rounds=3)
# int8 dynamic quantization of a random 2-layer BERT: measured ~5e-4 relative output error; the floor
# leaves room for other CPUs/ORT versions while still catching a broken graph (errors of order 1).
QUANT_REL_ERROR_FLOOR = 0.05


@pytest.fixture(scope="module", autouse=True)
def export_passes():
    """Register the three passes unless pyproject's entry points already provide them."""
    added = []
    for cls in (OnnxExportPass, OrtOptimizePass, OrtQuantizePass):
        if cls.name not in registry.pass_names():
            registry.register_pass(cls)
            added.append(cls.name)
    yield
    for name in added:
        registry.unregister_pass(name)


@pytest.fixture(scope="module")
def bert_workload():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0  # one padded row, so the attention mask matters
    return GenericWorkload(tiny_bert(), ((), {"input_ids": ids, "attention_mask": mask}))


def test_forms_and_config_validation():
    assert OnnxExportPass.takes == frozenset({MODULE}) and OnnxExportPass.gives == ONNX
    assert OrtOptimizePass.takes == frozenset({ONNX}) and OrtQuantizePass.takes == frozenset({ONNX})
    with pytest.raises(PassConfigError):
        OnnxExportPass(exporter="tvm")
    with pytest.raises(PassConfigError):
        OrtOptimizePass(level="max")
    with pytest.raises(PassConfigError):
        OrtQuantizePass(op_types="MatMul,Gemm")
    with pytest.raises(PassConfigError):
        OrtQuantizePass(exclude="(")
    assert str(OrtQuantizePass(op_types="MatMul|Gemm")) == 'ort-quantize{op_types=MatMul|Gemm}'


def test_export_then_compile_is_refused_when_parsed():
    with pytest.raises(PipelineParseError):
        ost.Pipeline.parse("onnx-export,compile")


def test_full_pipeline_applies_and_matches_torch(bert_workload):
    result = ost.Pipeline.parse("onnx-export,ort-optimize,ort-quantize").run(bert_workload, verbose=False,
                                                                            timing=QUICK)
    export, optimize, quantize = result.report.steps
    assert [s.status for s in result.report.steps] == ["applied"] * 3, [s.reason for s in result.report.steps]
    assert export.info["exporter"] == "dynamo" and export.info["provider"] == "CPUExecutionProvider"
    assert export.info["max_abs_diff"] <= 1e-4 and export.accuracy.after <= 1e-4
    assert optimize.info["max_abs_diff"] <= 1e-4 and optimize.accuracy.after <= 1e-4
    assert quantize.accuracy.after < QUANT_REL_ERROR_FLOOR
    assert quantize.info["nodes_MatMulInteger"] > 0
    assert quantize.info["file_bytes"] < quantize.info["file_bytes_before"]
    assert export.model_bytes == export.info["file_bytes"] > 0
    # the final model is callable like the module, with new shapes (dynamic axes) and extra kwargs dropped
    out = result.model(input_ids=torch.randint(0, 100, (3, 20)), attention_mask=torch.ones(3, 20, dtype=torch.long),
                       token_type_ids=torch.zeros(3, 20, dtype=torch.long))
    assert isinstance(out, tuple) and out[0].shape == (3, 20, 64)


def test_legacy_exporter_and_session_wrapper(bert_workload):
    ctx = PassContext(workload=bert_workload)
    args, kwargs = bert_workload.inputs
    before = bert_workload.model(**kwargs).last_hidden_state
    res = OnnxExportPass(exporter="legacy", intra_op_threads=1).apply(bert_workload.model, ctx)
    model = res.model
    assert isinstance(model, OrtModel) and res.info["exporter"] == "legacy"
    assert model.session.get_session_options().intra_op_num_threads == 1
    ref = bert_workload.model(**kwargs).last_hidden_state
    assert torch.equal(ref, before)  # exporting leaves the module as it was (eval mode, same weights)
    got = model(kwargs["input_ids"], kwargs["attention_mask"])  # positional works too
    assert torch.allclose(got[0], ref, atol=1e-4)
    opt = OrtOptimizePass(fusions="none", level="basic").apply(model, ctx)
    assert "fuser" not in opt.info and opt.info["max_abs_diff"] <= 1e-4
    # the legacy graph fuses into com.microsoft ops that ONNX shape inference cannot type; quantizing
    # after them must still work
    fused = OrtOptimizePass(fusions="ort").apply(model, ctx)
    assert fused.info["fuser"] == "ort" and fused.info.get("fused_SkipLayerNormalization", 0) > 0
    quant = OrtQuantizePass().apply(fused.model, ctx)
    assert quant.info["nodes_MatMulInteger"] > 0


def test_quantize_exclude_keeps_nodes_in_fp32(bert_workload):
    ctx = PassContext(workload=bert_workload)
    exported = OnnxExportPass().apply(bert_workload.model, ctx).model
    every = OrtQuantizePass(exclude=".*").apply(exported, ctx)
    assert every.modified is False and every.info["candidates"] == 0
    assert "nodes_MatMulInteger" not in every.info
    some = OrtQuantizePass(exclude="MatMul").apply(exported, ctx)  # node names hold their op type
    assert some.info["excluded"] > 0


def test_unsupported_op_names_it():
    class Eig(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real

    wl = GenericWorkload(Eig(), torch.randn(4, 4))
    with pytest.raises(PassApplyError, match=r"unsupported op .*eig"):
        OnnxExportPass().apply(Eig(), PassContext(workload=wl))


def test_apply_refuses_wrong_inputs():
    with pytest.raises(PassApplyError, match="expected an ONNX model"):
        OrtOptimizePass().apply(torch.nn.Linear(2, 2), PassContext())
    with pytest.raises(PassApplyError, match="needs example inputs"):
        OnnxExportPass().apply(torch.nn.Linear(2, 2), PassContext())


def test_optimize_modes_fold_the_weight_transposes_and_all_match_torch(bert_workload):
    import onnx

    ctx = PassContext(workload=bert_workload)
    _, kwargs = bert_workload.inputs
    ref = bert_workload.model(**kwargs).last_hidden_state
    with pytest.raises(PassConfigError):
        OnnxExportPass(optimize="rewrite")
    found = {}
    for mode in ("none", "fold", "full"):
        res = OnnxExportPass(optimize=mode).apply(bert_workload.model, ctx)
        assert torch.allclose(res.model(**kwargs)[0], ref, atol=1e-4), mode
        graph = onnx.load(res.model.path).graph
        inits = {i.name for i in graph.initializer}
        matmuls = [n for n in graph.node if n.op_type == "MatMul"]
        found[mode] = (len(graph.node), sum(n.input[1] in inits for n in matmuls))
    # without folding the weights reach their MatMuls through Transpose nodes (ort-quantize skips those);
    # folding gives the full optimizer's graph, less its pattern rewrites
    assert found["fold"][1] == found["full"][1] > found["none"][1]
    assert found["fold"][0] < found["none"][0]
