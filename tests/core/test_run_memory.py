"""Bounded memory per pass (core.model_copy): copy-on-write passes share what they leave, the rest get deep
copies, a broken promise is refused or caught, and neither the original nor the last good model changes."""
import hashlib
import runpy
from pathlib import Path

import pytest
import torch

import optistack as ost
from optistack.core.model_copy import TensorGuard, shared_copy
from optistack.core.pass_protocol import ConfiguredPass, PassResult
from optistack.core.registry import register_pass, unregister_pass
from optistack.testing.models import tiny_llama, tiny_llama_workload


def digest(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def storages(model):
    return {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}


class InPlace(ConfiguredPass):
    """Scales every weight in place and does not declare copy_on_write: it must get a deep copy."""

    name = "test-mem-inplace"

    def apply(self, model, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        return PassResult(model)


class Liar(InPlace):
    """Declares copy_on_write, then writes into a weight it shares: refused before the write."""

    name = "test-mem-liar"
    copy_on_write = True


class DataLiar(ConfiguredPass):
    """Declares copy_on_write, then rebinds a shared parameter's storage (`.data =`)."""

    name = "test-mem-dataliar"
    copy_on_write = True

    def apply(self, model, ctx):
        w = model.model.norm.weight
        w.data = torch.zeros_like(w)
        return PassResult(model)


class NaNHead(ConfiguredPass):
    """An honest copy-on-write pass whose result the gate refuses (a new head that outputs NaN)."""

    name = "test-mem-nanhead"
    copy_on_write = True

    def apply(self, model, ctx):
        head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        torch.nn.init.constant_(head.weight, float("nan"))
        model.lm_head = head
        return PassResult(model)


PASSES = (InPlace, Liar, DataLiar, NaNHead)


@pytest.fixture(scope="module", autouse=True)
def test_passes():
    for cls in PASSES:
        register_pass(cls)
    yield
    for cls in PASSES:
        unregister_pass(cls.name)


def run(text, model):
    return ost.Pipeline.parse(text).run(tiny_llama_workload(model, vocab_size=100), instruments=[], verbose=False)


def test_shared_copy_has_new_modules_and_the_same_tensors():
    model = tiny_llama()
    copy = shared_copy(model)
    assert copy.model.layers[0] is not model.model.layers[0] and copy.config is not model.config
    assert all(copy.get_parameter(n) is p for n, p in model.named_parameters())
    copy.model.layers[0].self_attn.q_proj = torch.nn.Identity()  # replacing in the copy leaves the model
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_rtn_int4_shares_what_it_did_not_replace_and_leaves_the_original():
    model = tiny_llama()
    before, ptrs = digest(model), storages(model)
    result = run("rtn-int4,identity", model)
    assert [s.status for s in result.report.steps] == ["applied", "applied"]
    assert digest(model) == before and isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    out = result.model
    assert type(out.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.input_layernorm.weight"):  # not replaced: the same storage, no new memory
        assert out.get_parameter(name).untyped_storage().data_ptr() == ptrs[name], name
    assert all(s.peak_rss_bytes and s.peak_rss_bytes > 0 for s in result.report.steps)


def test_a_pass_that_does_not_declare_copy_on_write_gets_a_deep_copy():
    model = tiny_llama()
    before, ptrs = digest(model), storages(model)
    result = run("test-mem-inplace", model)
    assert result.report.steps[0].status == "applied"
    assert digest(model) == before and digest(result.model) != before
    assert not set(storages(result.model).values()) & set(ptrs.values())


@pytest.mark.parametrize("liar", ["test-mem-liar", "test-mem-dataliar"])
def test_a_copy_on_write_pass_that_writes_in_place_is_refused_and_discarded(liar):
    model = tiny_llama()
    result = run(f"rtn-int4,{liar}", model)
    step = result.report.steps[1]
    assert step.status == "failed" and "declares copy_on_write" in step.reason, step.reason
    assert digest(model) == digest(tiny_llama())  # the same seed: the caller's model as it was
    assert digest(result.model) == digest(run("rtn-int4", tiny_llama()).model)  # the last good model, intact


def test_a_rejected_copy_on_write_step_leaves_the_previous_model_intact():
    model = tiny_llama()
    before = digest(model)
    result = run("rtn-int4,test-mem-nanhead", model)
    assert [s.status for s in result.report.steps] == ["applied", "rejected"]
    assert isinstance(result.model.lm_head, torch.nn.Linear) and torch.isfinite(result.model.lm_head.weight).all()
    assert digest(model) == before


def test_the_guard_names_tensors_written_outside_its_protection():
    model = tiny_llama()
    guard = TensorGuard(model)
    assert guard.changed() == []
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # outside protect() (a C++ extension's write is like this): seen after
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().clone())  # a new object: fine
    assert guard.changed() == ["lm_head.weight"]


def test_the_copy_on_write_example_runs():
    example = Path(__file__).resolve().parents[2] / "examples" / "copy_on_write_pass.py"
    try:
        scope = runpy.run_path(str(example), run_name="__main__")  # it asserts its outcomes itself
    finally:
        for name in ("example-half-mlp", "example-scale-norms"):
            unregister_pass(name)
    assert "tried to write in place (mul_)" in scope["result"].report.steps[1].reason


def test_awq_folds_its_scales_into_copies_of_the_blocks_and_shares_the_rest():
    model = tiny_llama()
    before = digest(model)
    result = run("awq{calib_samples=2,calib_seq_len=8,n_grid=2,quantize=false}", model)
    assert result.report.steps[0].status == "applied", result.report.steps[0].reason
    assert digest(model) == before  # the caller's norms and linears are not the ones scaled
    out = result.model
    assert out.model.embed_tokens.weight is model.model.embed_tokens.weight
    norm, mine = out.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight
    assert norm.untyped_storage().data_ptr() != mine.untyped_storage().data_ptr()  # the block was copied
