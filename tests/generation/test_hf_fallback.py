"""What a session cannot serve runs transformers' own loop with exactly one warning and the model's own
result; generate() is installed on what users hold (deep copies, torch.compile wrappers, loaded models)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from gen_fixtures import llama, optistack_warnings, ours, own_generate, prompt
from transformers import DynamicCache

import optistack
from optistack.core.hooks import DECODE_ATTR
from optistack.core.pass_protocol import PassContext
from optistack.generation import (
    FastGenerate,
    ModelSession,
    SessionUnavailable,
    carry_generate,
    install_generate,
    uninstall_generate,
)
from optistack.passes.decoding.kv_cache import KvCachePass
from optistack.passes.decoding.speculative import SpeculativePass

CTX = PassContext()


@pytest.fixture(scope="module")
def pair():
    base = llama()
    return base, KvCachePass().apply(copy.deepcopy(base), CTX).model


def fallback(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model.generate(*args, **kwargs)
    mine = optistack_warnings(seen)
    assert len(mine) == 1, mine
    assert model.generate.last["path"] == "fallback"
    return out, mine[0]


@pytest.mark.parametrize("options, why", [
    ({"num_beams": 3}, "num_beams=3 (beam search)"),
    ({"prompt_lookup_num_tokens": 3}, "assisted generation"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions / output_hidden_states"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
])
def test_what_a_session_cannot_serve_falls_back_with_one_warning(pair, options, why):
    base, m = pair
    ids = prompt()
    out, message = fallback(m, ids, max_new_tokens=8, do_sample=False, **options)
    assert why in message and "StaticCacheFactory does not serve" in message and "served by StaticCacheFactory:" in message
    want = own_generate(base, ids, max_new_tokens=8, do_sample=False, **options)
    assert torch.equal(out.sequences if hasattr(out, "sequences") else out,
                       want.sequences if hasattr(want, "sequences") else want)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_cache_passed_in_falls_back(pair, name):
    base, m = pair
    ids = prompt()
    out, message = fallback(m, ids, max_new_tokens=8, do_sample=False, **{name: DynamicCache(config=base.config)})
    assert "a cache was passed in" in message
    assert torch.equal(out, own_generate(base, ids, max_new_tokens=8, do_sample=False,
                                         **{name: DynamicCache(config=base.config)}))


def test_a_request_the_strategy_refuses_falls_back_inside_the_loop():
    base = llama()
    short = KvCachePass(max_cache_len=16).apply(copy.deepcopy(base), CTX).model
    ids = prompt()
    out, message = fallback(short, ids, max_new_tokens=12, do_sample=False)  # 21 positions > 16
    assert "needs 21 cache slots but max_cache_len=16" in message
    assert torch.equal(out, own_generate(base, ids, max_new_tokens=12, do_sample=False))
    assert torch.equal(ours(short, ids, max_new_tokens=6), own_generate(base, ids, max_new_tokens=6))  # 15: served


class CudaOnly:
    """A strategy that declares its devices (as a CPU-only engine declares ("cpu",))."""
    device_types = ("cuda",)

    def __call__(self, model, input_ids, max_new_tokens):
        raise AssertionError("not used by generate()")

    def open_session(self, model, batch, max_len):
        raise AssertionError("a strategy for another device must not be opened")


class Refuses(CudaOnly):
    device_types = None

    def open_session(self, model, batch, max_len):
        raise SessionUnavailable("this strategy holds 0 rows")


@pytest.mark.parametrize("strategy, why", [(CudaOnly(), "the prompt is on cpu; CudaOnly runs on cuda"),
                                           (Refuses(), "this strategy holds 0 rows")])
def test_a_strategy_for_another_device_or_size_falls_back(strategy, why):
    base = llama()
    m = copy.deepcopy(base)
    object.__setattr__(m, DECODE_ATTR, strategy)
    install_generate(m)
    ids = prompt()
    out, message = fallback(m, ids, max_new_tokens=6, do_sample=False)
    assert why in message and torch.equal(out, own_generate(base, ids, max_new_tokens=6, do_sample=False))


def test_a_strategy_without_sessions_is_served_by_the_models_forward():
    base = llama()
    m = copy.deepcopy(base)
    object.__setattr__(m, DECODE_ATTR, lambda model, ids, n: None)  # greedy_decode's protocol only
    install_generate(m)
    ids = prompt()
    assert torch.equal(ours(m, ids, max_new_tokens=8), own_generate(base, ids, max_new_tokens=8))
    assert m.generate.last["session"] == ModelSession.__name__


def test_installed_generate_follows_deep_copies_and_compile_wrappers(pair):
    base, m = pair
    ids = prompt()
    want = own_generate(base, ids, max_new_tokens=8)
    clone = copy.deepcopy(m)
    assert isinstance(clone.__dict__["generate"], FastGenerate) and clone.generate.model is clone
    assert torch.equal(ours(clone, ids, max_new_tokens=8), want)
    wrapped = torch.compile(m, backend="eager")
    assert wrapped.generate.model is m  # found through the wrapper: decodes on the module under it
    carry_generate(wrapped)
    assert wrapped.__dict__["generate"].model is wrapped and torch.equal(ours(wrapped, ids, max_new_tokens=8), want)
    plain = torch.compile(copy.deepcopy(base), backend="eager")
    assert carry_generate(plain) is plain and "generate" not in plain.__dict__  # nothing to carry
    install_generate(plain)
    assert torch.equal(ours(plain, ids, max_new_tokens=8), want)
    uninstall_generate(plain)
    assert "generate" not in plain.__dict__


def test_passes_install_generate_and_a_loaded_model_has_it_again(tmp_path):
    from optistack.core.persist import save_model

    original = llama()
    model = KvCachePass().apply(copy.deepcopy(original), CTX).model
    model = SpeculativePass(check_tokens=8).apply(model, CTX).model
    assert isinstance(model.__dict__["generate"], FastGenerate)

    def step(name, config):
        class Step:
            status, pass_name, info, text = "applied", name, {}, name
        Step.config = config
        return Step()

    save_model(tmp_path / "m", model, original, [step("kv-cache", {}), step("speculative", {"check_tokens": 8})], {})
    loaded = optistack.load_model(tmp_path / "m")
    assert isinstance(loaded.__dict__["generate"], FastGenerate) and loaded.generate.model is loaded
    ids = prompt()
    assert torch.equal(ours(loaded, ids, max_new_tokens=10), own_generate(original, ids, max_new_tokens=10))
    assert loaded.generate.last["session"] == "SpeculativeSession"
