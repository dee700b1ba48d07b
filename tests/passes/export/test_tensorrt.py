"""`tensorrt`: listed with its reason where it cannot run, form rules, config; a real build on a GPU."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import optistack as ost
from optistack.core.errors import PassConfigError, PipelineParseError
from optistack.core.pass_protocol import ENGINE, ONNX
from optistack.passes.export.tensorrt import TensorRTConfig, TensorRTPass, engine_key, profile_shapes

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_unavailable_here_says_why():
    avail = TensorRTPass().requirements()
    if HAS_TRT:
        assert avail.ok
    else:
        assert not avail.ok and ("tensorrt" in avail.reason or "CUDA" in avail.reason)
        listed = {row["name"]: row for row in ost.list_passes()}
        assert listed["tensorrt"]["available"] is False and listed["tensorrt"]["reason"] == avail.reason


def test_forms_onnx_to_engine():
    assert TensorRTPass.takes == frozenset({ONNX}) and TensorRTPass.gives == ENGINE
    ost.Pipeline.parse("onnx-export,ort-optimize,tensorrt{precision=fp16}")  # parses
    with pytest.raises(PipelineParseError, match="tensorrt"):
        ost.Pipeline.parse("tensorrt")  # needs an ONNX model first
    with pytest.raises(PipelineParseError):
        ost.Pipeline.parse("onnx-export,tensorrt,ort-quantize")  # an engine is not an ONNX graph


def test_config_validation_and_profiles():
    with pytest.raises(PassConfigError, match="batch"):
        TensorRTPass(batch="8:1:32")
    with pytest.raises(PassConfigError, match="precision"):
        TensorRTPass(precision="int4")
    assert profile_shapes((8, 128), (True, True), "", "1:64:512") == ((1, 1), (8, 64), (8, 512))
    assert profile_shapes((8, 128), (False, True), "1:8:32", "") == ((8, 1), (8, 128), (8, 128))
    cfg = TensorRTConfig()
    shapes = {"input_ids": ((1, 1), (8, 128), (8, 128))}
    assert engine_key(b"g", cfg, shapes, "11.4", "H200") != engine_key(
        b"g", TensorRTConfig(precision="fp32"), shapes, "11.4", "H200"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_matches_onnx_on_gpu(tmp_path):
    """The fp16 engine's outputs match the ONNX Runtime model's it was built from, on ids it was not built on."""
    from optistack.bench.timer import TimingConfig
    from optistack.testing import sqnr, tiny_bert
    from optistack.workloads.generic import GenericWorkload

    def outputs(model, ids):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out = out.to_tuple() if hasattr(out, "to_tuple") else out
        return [t.detach().float().cpu() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    ids = torch.randint(0, 100, (2, 16))
    wl = GenericWorkload(tiny_bert(), ((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    timing = TimingConfig(warmup=1, min_rounds=3, max_rounds=3)
    onnx = ost.Pipeline.parse("onnx-export").run(wl, verbose=False, timing=timing)
    assert onnx.report.steps[-1].status == "applied", onnx.report.steps[-1].reason
    text = f"onnx-export,tensorrt{{precision=fp16,cache_dir=\"{tmp_path}\"}}"
    result = ost.Pipeline.parse(text).run(wl, verbose=False, timing=timing)
    step = result.report.steps[-1]
    assert step.status == "applied", step.reason
    fresh = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    for check in (ids, fresh):
        want, got = outputs(onnx.model, check), outputs(result.model, check)
        assert len(got) == len(want) >= 1
        for w, g in zip(want, got):
            assert g.shape == w.shape and torch.isfinite(g).all()
            assert sqnr(w, g) >= 35.0, f"fp16 engine vs ONNX: {sqnr(w, g):.1f} dB"  # fp16 rounding: ~50-60 dB
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
    again = ost.Pipeline.parse(text).run(wl, verbose=False, timing=timing)
    assert again.report.steps[-1].info["engine_cached"] is True
    torch.testing.assert_close(outputs(again.model, fresh)[0], outputs(result.model, fresh)[0])
