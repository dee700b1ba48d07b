"""`head=int8|int4|keep` of rtn-int4/awq: the lm_head quantized on its own (tiny random Llama)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optistack.core.errors import PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.layers.int4 import Int4Linear
from optistack.layers.int8 import Int8Linear
from optistack.passes.quant.head import find_head, quantize_head
from optistack.passes.quant.rtn import RtnInt4Pass
from optistack.testing import sqnr, tiny_llama

CTX = PassContext()


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    lin = nn.Linear(96, 300, bias=True)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 96)
    with torch.no_grad():
        assert sqnr(lin(x), q(x)) > 38.0  # int8 per output channel: ~40 dB on Gaussian weights
        assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), q.bias),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head,kind", [("int8", Int8Linear), ("int4", Int4Linear), ("keep", nn.Linear)])
def test_tied_head_is_quantized_and_the_embedding_keeps_working(head, kind):
    model = tiny_llama(vocab_size=128, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    result = RtnInt4Pass(group_size=32, head=head).apply(copy.deepcopy(model), CTX)
    q = result.model
    assert type(q.lm_head) is kind and result.info["head"] == head
    assert type(q.model.embed_tokens.weight) is torch.nn.Parameter and q.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        out = q(ids).logits
        emb = q.model.embed_tokens(ids)
    torch.testing.assert_close(emb, model.model.embed_tokens(ids))  # the lookup reads the float weight
    assert sqnr(ref, out) > 15.0
    if head != "keep":
        assert result.info["head_tied_embedding"] is True and not q.config.tie_word_embeddings


def test_int8_head_costs_less_than_int4_head():
    model = tiny_llama(vocab_size=128)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        errs = {h: sqnr(ref, RtnInt4Pass(group_size=32, head=h).apply(copy.deepcopy(model), CTX).model(ids).logits)
                for h in ("keep", "int8", "int4")}
    assert errs["keep"] - errs["int8"] < 1.0 < errs["keep"] - errs["int4"]


def test_head_option_round_trips_and_rejects_bad_values():
    p = RtnInt4Pass(head="int8")
    assert str(p) == "rtn-int4{head=int8}"
    [(name, opts)] = parse_pipeline_text(str(p))
    assert RtnInt4Pass(**opts) == p
    assert str(RtnInt4Pass()) == "rtn-int4"
    with pytest.raises(PassConfigError, match="head"):
        RtnInt4Pass(head="int2")
    with pytest.raises(ValueError, match="option 'head' must be one of int8, int4, keep"):
        quantize_head(tiny_llama(), "fp8")


def test_a_head_the_skip_pattern_let_through_is_left_to_the_body_pass():
    model = tiny_llama(vocab_size=128)
    result = RtnInt4Pass(group_size=32, skip="^$", head="int8").apply(copy.deepcopy(model), CTX)
    assert type(result.model.lm_head) is Int4Linear and result.info["head"] == "body"
    assert find_head(result.model)[0] == "lm_head"


def test_int8_head_saves_and_loads(tmp_path):
    from optistack.checkpoints.loadables import load_model
    from optistack.core.persist import save_model

    model = tiny_llama(vocab_size=128, tie_word_embeddings=True)
    q = RtnInt4Pass(group_size=32, head="int8").apply(copy.deepcopy(model), CTX).model

    class Step:
        status, pass_name, text, info = "applied", "rtn-int4", "rtn-int4{group_size=32,head=int8}", {}
        config = {}

    save_model(tmp_path / "m", q, model, [Step()], {})
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.lm_head, Int8Linear)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, q(ids).logits, rtol=0, atol=0)
