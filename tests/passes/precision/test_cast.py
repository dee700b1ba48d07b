"""`cast`: bf16/fp16 weights or autocast, still called with fp32 inputs and returning fp32 outputs."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama
from torch import nn

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.core.syntax import parse_pipeline_text
from optistack.passes.precision.cast import CastPass

CTX = PassContext()


def rel_err(out, ref):
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def test_bad_options_name_pass_and_option():
    with pytest.raises(PassConfigError, match=r"^cast: option 'dtype'.*bf16, fp16"):
        CastPass(dtype="int3")
    with pytest.raises(PassConfigError, match=r"^cast: option 'mode'"):
        CastPass(mode="sometimes")


@pytest.mark.parametrize("p", [CastPass(), CastPass(dtype="fp16"), CastPass(dtype="fp16", mode="autocast")])
def test_text_round_trips(p):
    [(name, opts)] = parse_pipeline_text(str(p))
    assert name == "cast" and CastPass(**opts) == p
    assert str(CastPass(mode="autocast")) == "cast{mode=autocast}"


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_weights_mode_bert_keeps_output_object_and_accuracy(dtype, torch_dtype):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    ref = model(input_ids=ids, attention_mask=mask)
    result = CastPass(dtype=dtype).apply(copy.deepcopy(model), CTX)
    out = result.model(input_ids=ids, attention_mask=mask)
    assert result.modified and result.info["dtype"] == dtype
    assert type(out) is type(ref)  # the HF ModelOutput survives the output hook
    assert out.last_hidden_state.dtype == torch.float32 and out.pooler_output.dtype == torch.float32
    assert out["last_hidden_state"] is out.last_hidden_state
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 2e-2
    assert result.model.encoder.layer[0].intermediate.dense.weight.dtype == torch_dtype
    assert result.model.embeddings.position_ids.dtype == torch.long  # integer buffers untouched
    assert result.model.config.hidden_size == 64


def test_weights_mode_mlp_positional_and_keyword_float_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 16)
    ref = model(x)
    cast = CastPass().apply(copy.deepcopy(model), CTX).model
    assert cast[0].weight.dtype == torch.bfloat16
    out = cast(input=x)  # keyword input is cast too
    assert out.dtype == torch.float32 and x.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2
    assert torch.equal(cast(x), out)


def test_weights_mode_llama_generate_and_tuple_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 100, (1, 6))
    ref = model(ids).logits
    cast = CastPass().apply(copy.deepcopy(model), CTX).model
    logits = cast(ids).logits
    assert logits.dtype == torch.float32 and rel_err(logits, ref) < 2e-2
    tup = cast(ids, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dtype == torch.float32
    gen = cast.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 9)


def test_autocast_mode_keeps_fp32_weights_and_runs_matmuls_low_precision():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    ref = model(ids).last_hidden_state
    result = CastPass(mode="autocast").apply(copy.deepcopy(model), CTX)
    cast = result.model
    seen = []
    cast.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    out = cast(ids).last_hidden_state
    assert seen == [torch.bfloat16]
    assert out.dtype == torch.float32 and rel_err(out, ref) < 2e-2
    assert cast.encoder.layer[0].intermediate.dense.weight.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    assert result.info["device_type"] == "cpu"


def test_autocast_is_left_even_when_forward_raises():
    model = nn.Sequential(nn.Linear(8, 8))
    cast = CastPass(mode="autocast").apply(model, CTX).model
    with pytest.raises(RuntimeError):
        cast(torch.randn(2, 5))  # wrong width
    assert not torch.is_autocast_enabled("cpu")
    assert cast(torch.randn(2, 8)).dtype == torch.float32


@pytest.mark.parametrize("mode", ["weights", "autocast"])
def test_cast_twice_replaces_hooks_and_model_copies_and_pickles(mode):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    cast = CastPass(mode=mode).apply(model, CTX).model
    cast = CastPass(mode=mode, dtype="fp16").apply(cast, CTX).model
    assert len(cast._forward_pre_hooks) == 1 and len(cast._forward_hooks) == 1
    x = torch.randn(3, 8)
    expected = cast(x)
    assert torch.equal(copy.deepcopy(cast)(x), expected)
    buf = io.BytesIO()
    torch.save(cast, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), expected)


def test_apply_raises_without_floating_weights():
    with pytest.raises(PassApplyError, match="^cast: .*floating-point"):
        CastPass().apply(nn.ReLU(), CTX)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "autocast"])
def test_cast_model_survives_torch_compile(mode):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    fp32 = model(ids).last_hidden_state
    cast = CastPass(mode=mode).apply(model, CTX).model
    eager = cast(ids).last_hidden_state
    assert not torch.equal(eager, fp32)
    compiled = torch.compile(cast, backend="aot_eager")
    out = compiled(ids)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    # same numbers as the eager cast model: autocast hooks run eagerly around the compiled forward
    torch.testing.assert_close(out.last_hidden_state, eager, rtol=1e-5, atol=1e-5)
