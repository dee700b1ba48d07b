"""`openvino`: forms and config, a tiny BERT converted and checked against torch, save/load, NNCF int8."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import tiny_bert

import optistack as ost
from optistack.bench.timer import TimingConfig
from optistack.core.errors import PassConfigError, PipelineParseError
from optistack.core.pass_protocol import ENGINE, MODULE, ONNX, PassContext
from optistack.passes.export.openvino import OpenVINOPass, OvModel, compile_options
from optistack.workloads.generic import GenericWorkload

HAS_OV = importlib.util.find_spec("openvino") is not None
needs_ov = pytest.mark.skipif(not HAS_OV, reason="openvino not installed (pip install 'optistack[openvino]')")
QUICK = TimingConfig(warmup=1, min_rounds=3, max_rounds=3)
# NNCF int8 of a random 2-layer BERT: measured ~5e-3 relative output error; the floor still catches a
# broken graph (errors of order 1).
INT8_REL_ERROR_FLOOR = 0.05


@pytest.fixture(scope="module")
def bert_workload():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0  # one padded row, so the attention mask matters
    return GenericWorkload(tiny_bert(), ((), {"input_ids": ids, "attention_mask": mask}))


def test_unavailable_says_why_and_forms():
    avail = OpenVINOPass().requirements()
    assert avail.ok == HAS_OV and (HAS_OV or "optistack[openvino]" in avail.reason)
    assert OpenVINOPass.takes == frozenset({MODULE, ONNX}) and OpenVINOPass.gives == ENGINE
    ost.Pipeline.parse("onnx-export,openvino{precision=bf16}")  # an ONNX graph is taken too
    with pytest.raises(PipelineParseError):
        ost.Pipeline.parse("openvino,compile")  # an OpenVINO model is not a torch module
    with pytest.raises(PipelineParseError):
        ost.Pipeline.parse("openvino,ort-optimize")


def test_config_validation_and_plugin_options():
    with pytest.raises(PassConfigError, match="threads"):
        OpenVINOPass(threads=-1)
    with pytest.raises(PassConfigError, match="precision"):
        OpenVINOPass(precision="int4")
    with pytest.raises(PassConfigError, match="calib_batches"):
        OpenVINOPass(quantize="int8", calib_batches=0)
    # f32 is always asked for explicitly: on bf16-capable CPUs OpenVINO's own default is bf16
    assert compile_options("f32", 0, "latency", False) == {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    assert compile_options("bf16", 2, "throughput", True)["INFERENCE_NUM_THREADS"] == 2


@pytest.fixture(scope="module")
def f32_result(bert_workload):
    if not HAS_OV:
        pytest.skip("openvino not installed")
    return OpenVINOPass(threads=1).apply(bert_workload.model, PassContext(workload=bert_workload))


@needs_ov
def test_f32_matches_torch_and_reports_what_the_plugin_chose(bert_workload, f32_result):
    engine, info = f32_result.model, f32_result.info
    assert isinstance(engine, OvModel) and info["max_rel_diff"] < 1e-4
    assert info["inference_precision"] == "f32" and info["pinning_used"] == "False" and info["threads_used"] == "1"
    args, kwargs = bert_workload.inputs
    ref = bert_workload.model(**kwargs)
    out = engine(**kwargs)  # a tuple in graph output order, like OrtModel
    assert isinstance(out, tuple) and torch.allclose(out[0], ref.last_hidden_state, atol=1e-4)
    positional = engine(kwargs["input_ids"], kwargs["attention_mask"])  # free inputs in graph order
    assert torch.equal(positional[0], out[0])
    with pytest.raises(TypeError, match="needs input"):
        engine(input_ids=kwargs["input_ids"])


@needs_ov
def test_save_and_load_give_the_same_outputs(tmp_path, bert_workload, f32_result):
    engine = f32_result.model
    files = engine.save_to(str(tmp_path))
    assert files == ["model.xml", "model.bin"] and all((tmp_path / f).stat().st_size > 0 for f in files)
    loaded = OvModel.load_from(str(tmp_path), files[0], engine.session_options())
    kwargs = bert_workload.inputs[1]
    assert torch.equal(loaded(**kwargs)[0], engine(**kwargs)[0])
    with pytest.raises(ValueError, match="not loaded"):
        OvModel.load_from(str(tmp_path), files[0], {**engine.session_options(), "cache_dir": "/tmp"})


@needs_ov
def test_runs_through_the_instrument_as_an_engine(bert_workload):
    result = ost.Pipeline.parse("openvino{precision=bf16,threads=1}").run(bert_workload, verbose=False, timing=QUICK)
    step = result.report.steps[0]
    assert step.status == "applied", step.reason
    assert step.info["inference_precision"] in ("bf16", "f32")  # f32 where the CPU has no bf16
    assert step.accuracy.after < 0.05 and step.speedup["median"] > 0


@needs_ov
@pytest.mark.slow
def test_int8_through_nncf_keeps_outputs_close(bert_workload):
    pytest.importorskip("nncf")
    result = OpenVINOPass(quantize="int8", calib_batches=2, threads=1).apply(
        bert_workload.model, PassContext(workload=bert_workload))
    assert result.info["quantize"] == "int8" and result.info["calib_batches"] >= 1
    assert result.info["max_rel_diff"] < INT8_REL_ERROR_FLOOR
    assert result.info["weight_bytes"] < 0.5 * sum(p.numel() * 4 for p in bert_workload.model.parameters())


@needs_ov
@pytest.mark.slow
def test_from_an_exported_onnx_graph(bert_workload):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = ost.Pipeline.parse("onnx-export,openvino{threads=1}").apply(
        bert_workload.model, PassContext(workload=bert_workload)).model
    kwargs = bert_workload.inputs[1]
    assert torch.allclose(model(**kwargs)[0], bert_workload.model(**kwargs).last_hidden_state, atol=1e-4)
