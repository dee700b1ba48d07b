"""`int8-dynamic` / `int8-weight`: torchao int8 Linear quantization with SQNR floors."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.passes.quant.int8 import Int8DynamicPass, Int8WeightPass
from optistack.testing import sqnr, tiny_llama
from optistack.testing import tiny_mlp as _tiny_mlp

pytestmark = pytest.mark.skipif(not Int8WeightPass().requirements(), reason="torchao is not installed")

CTX = PassContext()
PASSES = [Int8DynamicPass, Int8WeightPass]


def tiny_mlp():
    return _tiny_mlp(64, 256, 64, 8)


def is_quantized(linear):
    return type(linear.weight.data) is not torch.Tensor


@pytest.mark.parametrize("cls", PASSES)
def test_sqnr_floor_on_tiny_mlp(cls):
    model = tiny_mlp()
    x = torch.randn(32, 64)
    ref = model(x)
    result = cls(min_features=8).apply(copy.deepcopy(model), CTX)
    assert result.modified
    assert result.info == {"linears_quantized": 3, "linears_skipped": 0}
    assert all(is_quantized(result.model[i]) for i in (0, 2, 4))
    with torch.no_grad():
        assert sqnr(ref, result.model(x)) >= 25.0


@pytest.mark.parametrize("cls", PASSES)
def test_skip_regex_and_min_features_leave_layers_float(cls):
    model = tiny_mlp()  # the last layer has 8 outputs: below min_features=16
    result = cls(skip="^0$").apply(model, CTX)
    assert result.info == {"linears_quantized": 1, "linears_skipped": 2}
    assert not is_quantized(model[0]) and is_quantized(model[2]) and not is_quantized(model[4])
    assert model(torch.randn(2, 64)).shape == (2, 8)


def test_llama_lm_head_skip():
    model = tiny_llama(vocab_size=100)
    ids = torch.randint(0, 100, (1, 8))
    ref = model(ids).logits
    result = Int8DynamicPass(skip="lm_head").apply(copy.deepcopy(model), CTX)
    assert result.info == {"linears_quantized": 14, "linears_skipped": 1}
    assert not is_quantized(result.model.lm_head) and is_quantized(result.model.model.layers[0].mlp.up_proj)
    with torch.no_grad():
        assert sqnr(ref, result.model(ids).logits) >= 25.0


def test_everything_skipped_is_an_honest_no_op():
    model = tiny_mlp()
    result = Int8WeightPass(min_features=1000).apply(model, CTX)
    assert not result.modified and result.info["linears_quantized"] == 0
    assert not any(is_quantized(m) for m in model if isinstance(m, nn.Linear))


@pytest.mark.parametrize("cls", PASSES)
def test_no_linears_is_nothing_to_change(cls):
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU())
    result = cls().apply(model, CTX)
    assert not result.modified and result.info["reason"].startswith("nothing to change: the model has no nn.Linear")
    with pytest.raises(PassApplyError, match=f"^{cls.name}: expected a torch.nn.Module"):
        cls().apply(object(), CTX)


def test_bad_options_name_pass_and_option():
    with pytest.raises(PassConfigError, match=r"^int8-dynamic: option 'skip' must be a regular expression"):
        Int8DynamicPass(skip="(")
    with pytest.raises(PassConfigError, match=r"^int8-weight: option 'min_features' must be an integer"):
        Int8WeightPass(min_features="many")
    with pytest.raises(PassConfigError, match=r"^int8-weight: option 'min_features' must be >= 1"):
        Int8WeightPass(min_features=0)


@pytest.mark.parametrize(
    "p, text",
    [(Int8DynamicPass(), "int8-dynamic"), (Int8WeightPass(skip="lm_head|embed", min_features=32),
                                           "int8-weight{skip=lm_head|embed,min_features=32}")],
)
def test_text_round_trips(p, text):
    assert str(p) == text
    [(name, opts)] = parse_pipeline_text(text)
    assert type(p)(**opts) == p


def test_quantize_leaves_logger_levels_alone():
    levels = {n: logging.getLogger(n).level for n in ("torchao", "torch.utils._pytree")}
    Int8WeightPass().apply(tiny_mlp(), CTX)
    assert {n: logging.getLogger(n).level for n in levels} == levels
