"""The `fuse-kernels` pass on a tiny Llama: what it replaces, that outputs stay put, save/load,
and clear answers for bad options and models with nothing to fuse."""
import copy

import pytest
import torch

from optistack.core.errors import PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.kernels import cpu
from optistack.kernels.modules import FusedGatedMLP, FusedInt4Linear, FusedRMSNorm
from optistack.layers.int4 import Int4Linear
from optistack.passes.kernels.fuse import FuseKernelsPass
from tests.tiny_models import tiny_llama

needs_cpp = pytest.mark.skipif(not cpu.available(), reason=f"cpu-cpp unavailable: {cpu.available().reason}")


def ids(n=12):
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(0))


def int4_llama():
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, Int4Linear.from_linear(getattr(layer.self_attn, name), 64))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, Int4Linear.from_linear(getattr(layer.mlp, name), 64))
    return model


@needs_cpp
def test_float_llama_fused_matches_eager():
    model = tiny_llama()
    want = model(ids()).logits
    res = FuseKernelsPass().apply(copy.deepcopy(model), PassContext())
    fused = res.model
    assert res.info["backend"] == "cpu-cpp"
    assert res.info["replaced_rmsnorm"] == 5 and res.info["replaced_swiglu"] == 2 and res.info["replaced_int4"] == 0
    assert isinstance(fused.model.norm, FusedRMSNorm) and isinstance(fused.model.layers[0].mlp, FusedGatedMLP)
    torch.testing.assert_close(fused(ids()).logits, want, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_int4_llama_fused_matches_int4_model():
    model = int4_llama()
    want = model(ids()).logits
    fused = FuseKernelsPass().apply(copy.deepcopy(model), PassContext()).model
    mlp = fused.model.layers[0].mlp
    assert isinstance(mlp.gate_up, FusedInt4Linear) and isinstance(mlp.down_proj, FusedInt4Linear)
    assert isinstance(fused.model.layers[1].self_attn.q_proj, FusedInt4Linear)
    # Int4Linear runs torch's kernel in bf16; ours keeps float32 activations: close, not equal
    torch.testing.assert_close(fused(ids()).logits, want, rtol=2e-2, atol=2e-2)


@needs_cpp
def test_patterns_option_limits_what_is_fused():
    model = int4_llama()
    res = FuseKernelsPass(patterns="int4").apply(model, PassContext())
    assert res.info["replaced_int4"] == 14 and "replaced_rmsnorm" in res.info and res.info["replaced_rmsnorm"] == 0
    assert type(res.model.model.norm).__name__ == "LlamaRMSNorm"
    assert isinstance(res.model.model.layers[0].mlp.gate_proj, FusedInt4Linear)


def test_torch_backend_runs_anywhere_and_reports():
    model = tiny_llama()
    want = model(ids()).logits
    res = FuseKernelsPass(backend="torch", patterns="rmsnorm,swiglu").apply(copy.deepcopy(model), PassContext())
    assert res.info["backend"] == "torch" and res.info["replaced_rmsnorm"] == 5
    torch.testing.assert_close(res.model(ids()).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_options_and_nothing_to_fuse():
    with pytest.raises(PassConfigError, match="patterns"):
        FuseKernelsPass(patterns="rmsnorm,gelu")
    with pytest.raises(PassConfigError, match="backend"):
        FuseKernelsPass(backend="opencl")
    result = FuseKernelsPass().apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), PassContext())
    assert not result.modified and result.info["reason"].startswith("nothing to change: nothing to fuse")


def test_fp8_linears_are_left_with_a_reason():
    from optistack.layers.fp8 import Fp8Linear

    model = torch.nn.Sequential(Fp8Linear.from_linear(torch.nn.Linear(32, 32)))
    res = FuseKernelsPass(patterns="fp8", backend="torch").apply(model, PassContext())
    assert res.info["found_fp8"] == 1 and "emulation" in res.info["fp8_left"]
    assert isinstance(res.model[0], Fp8Linear) and not res.modified


@needs_cpp
def test_save_and_load_roundtrip(tmp_path):
    model = int4_llama()
    fused = FuseKernelsPass().apply(copy.deepcopy(model), PassContext()).model
    from optistack.checkpoints.loadables import load_model
    from optistack.core.persist import save_model

    class Step:
        status, pass_name, text, info = "applied", "fuse-kernels", "fuse-kernels", {}
        config = {}

    save_model(tmp_path / "m", fused, model, [Step()], {})
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.model.layers[0].mlp.gate_up, FusedInt4Linear)
    torch.testing.assert_close(loaded(ids()).logits, fused(ids()).logits, rtol=0, atol=0)


def test_int4_spec_refuses_a_layout_this_version_would_misread():
    """cpu-cpp stores K > 4096 in chunks; a save from before that (no layout recorded) is whole rows."""
    codes = torch.randint(0, 16, (8, 8192), dtype=torch.uint8)
    scale, zero = torch.full((8, 128), 0.01), torch.zeros(8, 128)
    lin = FusedInt4Linear.from_parts(codes, scale, zero, 64, 8192, None, "torch")
    spec = {**lin.optistack_spec(), "backend": "cpu-cpp", "layout": None}
    with pytest.raises(ValueError, match="re-pack"):
        FusedInt4Linear.from_optistack_spec(spec)
    narrow = {**spec, "packed_k": 4096, "in_features": 4096}  # one chunk: the old bytes are the same
    assert FusedInt4Linear.from_optistack_spec(narrow).packed_k == 4096


def test_cpu_model_left_unchanged_with_the_reason_when_no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    model = tiny_llama()
    res = FuseKernelsPass().apply(model, PassContext())
    assert not res.modified and res.info["backend"] == "none"
    assert "compiler" in res.info["backends_not_used"] and "unchanged" in res.info["reason"]
    assert type(res.model.model.norm).__name__ == "LlamaRMSNorm"
