"""Transformer fusions of an exported graph, and the Attention unpacking that lets int8 reach the QKV projection."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from tiny_models import tiny_bert  # noqa: E402

from optistack.core.pass_protocol import PassContext  # noqa: E402
from optistack.passes.export.fusions import op_counts, unpack_attention  # noqa: E402
from optistack.passes.export.onnx import OnnxExportPass  # noqa: E402
from optistack.passes.export.ort import OrtOptimizePass  # noqa: E402
from optistack.passes.export.ort_quantize import OrtQuantizePass  # noqa: E402
from optistack.passes.export.session import OrtModel  # noqa: E402
from optistack.workloads.generic import GenericWorkload  # noqa: E402


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # padding: the additive attention mask must survive every rewrite
    wl = GenericWorkload(tiny_bert(), ((), {"input_ids": ids, "attention_mask": mask}))
    ctx = PassContext(workload=wl)
    exported = OnnxExportPass().apply(wl.model, ctx).model
    return wl, OrtOptimizePass(fusions="onnxscript").apply(exported, ctx)


def test_onnxscript_fuses_the_dynamo_graph(fused):
    _, res = fused
    assert res.info["fuser"] == "onnxscript"
    assert res.info["fused_Attention"] == 2 and res.info["fused_SkipLayerNormalization"] > 0
    assert res.info["max_abs_diff"] <= 1e-4


def test_unpacked_attention_gives_the_same_outputs(fused, tmp_path):
    wl, res = fused
    proto = onnx.load(res.model.path)
    assert unpack_attention(proto) == 2
    path = tmp_path / "unpacked.onnx"
    onnx.save(proto, path)
    counts = op_counts(str(path))
    assert counts["Attention"] == 0 and counts["MultiHeadAttention"] == 2
    _, kwargs = wl.inputs
    got, ref = OrtModel(str(path))(**kwargs)[0], res.model(**kwargs)[0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_quantize_reaches_the_qkv_projection(fused):
    wl, res = fused
    ctx = PassContext(workload=wl)
    packed = OrtQuantizePass(unpack_attention=False).apply(res.model, ctx)
    unpacked = OrtQuantizePass().apply(res.model, ctx)
    assert unpacked.info["unpacked_attention"] == 2
    assert unpacked.info["nodes_MatMulInteger"] == packed.info["nodes_MatMulInteger"] + 2
    _, kwargs = wl.inputs
    ref = wl.model(**kwargs).last_hidden_state
    err = ((unpacked.model(**kwargs)[0] - ref).norm() / ref.norm()).item()
    assert err < 0.05
