"""`compile`: torch.compile wrapper; validation is cheap, the compiled cases are marked slow."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import COMPILED, MODULE, PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.passes.compile.inductor import CompilePass
from optistack.testing import tiny_bert, tiny_mlp

CTX = PassContext()


def test_declares_forms():
    assert CompilePass.takes == frozenset({MODULE}) and CompilePass.gives == COMPILED


def test_bad_backend_lists_valid_ones():
    with pytest.raises(PassConfigError, match=r"^compile: option 'backend'.*inductor.*got 'nope'"):
        CompilePass(backend="nope")


def test_bad_mode_and_mode_backend_mismatch():
    with pytest.raises(PassConfigError, match=r"^compile: option 'mode' must be one of default"):
        CompilePass(mode="fast")
    with pytest.raises(PassConfigError, match=r"^compile: option 'mode=max-autotune' needs backend=inductor"):
        CompilePass(mode="max-autotune", backend="eager")


@pytest.mark.parametrize(
    "p, text",
    [
        (CompilePass(), "compile"),
        (CompilePass(backend="aot_eager", dynamic=True), "compile{backend=aot_eager,dynamic=true}"),
        (CompilePass(mode="max-autotune-no-cudagraphs", fullgraph=True),
         "compile{mode=max-autotune-no-cudagraphs,fullgraph=true}"),
    ],
)
def test_text_round_trips(p, text):
    assert str(p) == text
    [(name, opts)] = parse_pipeline_text(text)
    assert name == "compile" and CompilePass(**opts) == p


def test_requirements_name_missing_compiler(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    avail = CompilePass().requirements()
    assert not avail and "C++ compiler" in avail.reason
    assert CompilePass(backend="aot_eager").requirements()


def test_apply_refuses_non_modules_and_double_compile():
    with pytest.raises(PassApplyError, match="^compile: expected a torch.nn.Module"):
        CompilePass().apply(lambda x: x, CTX)
    compiled = CompilePass(backend="eager").apply(tiny_mlp(), CTX).model
    with pytest.raises(PassApplyError, match="^compile: .*already"):
        CompilePass().apply(compiled, CTX)


@pytest.mark.slow
def test_inductor_matches_eager():
    if not CompilePass().requirements():
        pytest.skip(CompilePass().requirements().reason)
    model = tiny_mlp()
    x = torch.randn(4, 16)
    ref = model(x)
    result = CompilePass().apply(model, CTX)
    assert result.modified and result.info["backend"] == "inductor"
    torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-5)  # warm call, compiled graph


@pytest.mark.slow
def test_aot_eager_keeps_hf_attributes():
    model = tiny_bert(num_hidden_layers=1)
    ids = torch.randint(0, 100, (2, 8))
    ref = model(ids).last_hidden_state
    compiled = CompilePass(backend="aot_eager").apply(model, CTX).model
    assert compiled.config.hidden_size == 64  # attribute access passes through
    torch.testing.assert_close(compiled(ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_freezing_needs_inductor():
    with pytest.raises(PassConfigError, match=r"^compile: option 'freezing=true' is an Inductor setting"):
        CompilePass(freezing=True, backend="aot_eager")
    assert str(CompilePass(freezing=True)) == "compile{freezing=true}"


@pytest.mark.slow
def test_freezing_matches_eager_and_really_freezes():
    """Freezing folds the weights into the graph: outputs stay equal to eager, and a later in-place edit
    of a weight is no longer seen (which is how we know the setting reached Dynamo and Inductor)."""
    if not CompilePass().requirements():
        pytest.skip(CompilePass().requirements().reason)
    import torch._inductor.config as inductor_config

    model = tiny_mlp()
    x = torch.randn(4, 16)
    with torch.inference_mode():
        ref = model(x)
        result = CompilePass(freezing=True).apply(model, CTX)
        assert result.info["freezing"] is True
        torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-5)
        assert inductor_config.freezing is False  # only around the compiled module's calls
        model[0].weight.add_(1.0)
        torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-5)  # frozen: the edit is unseen
        assert not torch.allclose(model(x), ref)


def test_cpp_wrapper_round_trips_and_needs_inductor():
    p = CompilePass(freezing=True, cpp_wrapper=True)
    assert str(p) == "compile{freezing=true,cpp_wrapper=true}"
    [(name, opts)] = parse_pipeline_text(str(p))
    assert CompilePass(**opts) == p
    with pytest.raises(PassConfigError, match=r"^compile: option 'cpp_wrapper=true' is an Inductor setting"):
        CompilePass(backend="eager", cpp_wrapper=True)


def test_inductor_settings_apply_only_around_the_compiled_calls():
    import torch._inductor.config as inductor_config

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((inductor_config.cpp_wrapper, inductor_config.freezing))
            return x + 1

    compiled = CompilePass(backend="eager", freezing=False).apply(Probe(), CTX).model
    from optistack.passes.compile.inductor import patch_when_compiling

    patch_when_compiling(compiled, cpp_wrapper=True, freezing=True)
    compiled(torch.ones(2))
    assert seen and seen[-1] == (True, True)
    assert (inductor_config.cpp_wrapper, inductor_config.freezing) == (False, False)
