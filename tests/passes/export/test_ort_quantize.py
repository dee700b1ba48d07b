"""`ort-quantize` modes (dynamic / static QDQ), sensitive layers kept in fp32, and save/load of the result."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import tiny_bert  # noqa: E402

import optistack as ost  # noqa: E402
from optistack.bench.timer import TimingConfig  # noqa: E402
from optistack.core.errors import PassApplyError, PassConfigError  # noqa: E402
from optistack.core.pass_protocol import PassContext  # noqa: E402
from optistack.passes.export.onnx import OnnxExportPass  # noqa: E402
from optistack.passes.export.ort import OrtOptimizePass  # noqa: E402
from optistack.passes.export.ort_quantize import OrtQuantizePass  # noqa: E402
from optistack.workloads.generic import GenericWorkload  # noqa: E402

QUICK = TimingConfig(warmup=1, min_rounds=3, max_rounds=3)
# int8 of a random 2-layer BERT: ~1e-3 relative output error measured; the floor catches broken graphs.
QUANT_REL_ERROR_FLOOR = 0.05


@pytest.fixture(scope="module")
def workload():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return GenericWorkload(tiny_bert(), ((), {"input_ids": ids, "attention_mask": mask}))


@pytest.fixture(scope="module")
def exported(workload):
    return OnnxExportPass().apply(workload.model, PassContext(workload=workload)).model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_config_is_validated():
    with pytest.raises(PassConfigError, match="keep_fp32"):
        OrtQuantizePass(keep_fp32=-1)
    with pytest.raises(PassConfigError, match="mode"):
        OrtQuantizePass(mode="qat")
    with pytest.raises(PassConfigError, match="calibration"):
        OrtQuantizePass(mode="static", calibration="kl")


def test_static_qdq_uses_calibration_and_stays_close(workload, exported):
    ctx = PassContext(workload=workload)
    res = OrtQuantizePass(mode="static").apply(exported, ctx)
    assert res.info["mode"] == "static" and res.info["nodes_QuantizeLinear"] > 0
    assert res.info["nodes_DequantizeLinear"] > 0
    _, kwargs = workload.inputs
    ref = workload.model(**kwargs).last_hidden_state
    assert rel_error(res.model(**kwargs)[0], ref) < QUANT_REL_ERROR_FLOOR


def test_keep_fp32_leaves_the_most_sensitive_nodes_unquantized(workload, exported):
    ctx = PassContext(workload=workload)
    full = OrtQuantizePass().apply(exported, ctx)
    kept = OrtQuantizePass(keep_fp32=2).apply(exported, ctx)
    assert len(kept.info["kept_fp32"].split(",")) == 2 and "most_sensitive" in kept.info
    assert kept.info["nodes_MatMulInteger"] == full.info["nodes_MatMulInteger"] - 2
    _, kwargs = workload.inputs
    ref = workload.model(**kwargs).last_hidden_state
    # leaving the two worst layers in fp32 must not make the output worse
    assert rel_error(kept.model(**kwargs)[0], ref) <= rel_error(full.model(**kwargs)[0], ref) * 1.05


def test_static_mode_without_calibration_data_is_a_clear_error(exported):
    with pytest.raises(PassApplyError, match="need calibration inputs"):
        OrtQuantizePass(mode="static").apply(exported, PassContext())


def test_exported_then_quantized_model_saves_and_loads_with_same_outputs(workload, tmp_path):
    pipeline = "onnx-export,ort-optimize{intra_op_threads=1},ort-quantize"
    result = ost.Pipeline.parse(pipeline).run(workload, verbose=False, timing=QUICK)
    assert [s.status for s in result.report.steps] == ["applied"] * 3
    folder = result.save(tmp_path / "saved")
    loaded = ost.load_model(folder)
    _, kwargs = workload.inputs
    assert torch.equal(loaded(**kwargs)[0], result.model(**kwargs)[0])
    assert loaded.intra_op_threads == 1 and loaded.session.get_session_options().intra_op_num_threads == 1
    assert (folder / "optistack.json").exists() and not (folder / "model.safetensors").exists()


def test_optimize_session_options_are_honored(workload, exported):
    res = OrtOptimizePass(intra_op_threads=1, inter_op_threads=1, execution_mode="parallel").apply(
        exported, PassContext(workload=workload))
    opts = res.model.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert res.info["threads"] == "intra=1,inter=1"


def test_providers_auto_is_cpu_here_and_a_missing_one_is_named():
    from optistack.passes.export.session import choose_providers

    if not torch.cuda.is_available():
        assert choose_providers("auto") == ["CPUExecutionProvider"]
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            with pytest.raises(ValueError, match="no CUDAExecutionProvider.*optistack\\[gpu\\]"):
                choose_providers("cuda")
    with pytest.raises(ValueError, match="unknown ONNX Runtime provider"):
        choose_providers("rocm")
