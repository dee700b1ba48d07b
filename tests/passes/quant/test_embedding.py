"""embed-int8: the token embedding as int8 rows (within half a step of the float rows, checked against the
float table itself), the tied int8 head's own rows where they are the same numbers, refusals with reasons,
saved and loaded, and read by the decode engine with the model's own numbers."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.layers.int8_embedding import Int8Embedding
from optistack.testing.models import tiny_llama


def apply(model, chain):
    return Pipeline.parse(chain).apply(copy.deepcopy(model), PassContext())


def int8_head(model):
    from optistack.layers.int8 import Int8Linear

    model.lm_head = Int8Linear.from_linear(model.lm_head, kernel="torch")
    if model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False
    return model


def test_rows_stay_within_half_a_step_of_the_float_table():
    model = tiny_llama(vocab_size=200, tie_word_embeddings=False)
    table = model.get_input_embeddings().weight.detach().clone()
    out = apply(model, "embed-int8")
    emb = out.model.get_input_embeddings()
    assert isinstance(emb, Int8Embedding) and emb.qweight.dtype == torch.int8
    ids = torch.tensor([[0, 5, 199, 5], [17, 3, 2, 1]])
    got = emb(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 4, table.shape[1])
    step = table.abs().amax(dim=1) / 127  # each row's own grid
    assert bool(((got - table[ids]).abs() <= step[ids].unsqueeze(-1) / 2 + 1e-7).all())
    assert bool((got != table[ids]).any())  # really rounded, not a float copy
    assert out.info["embed-int8.embedding"] == "int8 rows"
    with torch.no_grad():  # the model still runs, close to the float model
        want, have = model(ids).logits, out.model(ids).logits
    assert float((have - want).norm() / want.norm()) < 0.02


def test_a_tied_int8_head_lends_its_rows():
    model = int8_head(tiny_llama(vocab_size=200, tie_word_embeddings=True))
    out = apply(model, "embed-int8")
    emb, head = out.model.get_input_embeddings(), out.model.get_output_embeddings()
    assert emb.qweight is head.qweight and emb.scale is head.scale
    assert out.info["embed-int8.embedding"] == "int8 rows, the int8 head's own"
    assert out.info["embed-int8.embedding_mb"].endswith("-> 0.0")
    untied = int8_head(tiny_llama(vocab_size=200, tie_word_embeddings=False))  # another matrix: its own rows
    emb2 = apply(untied, "embed-int8").model.get_input_embeddings()
    assert emb2.qweight.data_ptr() != untied.lm_head.qweight.data_ptr()


class Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


@pytest.mark.parametrize("change,reason", [
    (lambda m: m.model.set_input_embeddings(Scaled(200, 64)), "Scaled, not a plain nn.Embedding"),
    (lambda m: setattr(m.model.embed_tokens, "max_norm", 1.0), "max_norm"),
    (lambda m: m.model.embed_tokens.to(torch.bfloat16), "not float32"),
    (lambda m: (setattr(m.config, "tie_word_embeddings", True), m.tie_weights()), "quantize the head first"),
])
def test_what_it_cannot_keep_exact_is_left_alone_with_the_reason(change, reason):
    model = tiny_llama(vocab_size=200)
    change(model)
    out = apply(model, "embed-int8")
    assert not isinstance(out.model.get_input_embeddings(), Int8Embedding)
    assert reason in out.info["embed-int8.reason"]
    again = apply(apply(tiny_llama(vocab_size=200), "embed-int8").model, "embed-int8")
    assert again.info["embed-int8.reason"] == "the embedding is int8 already"


def test_saved_and_loaded_with_the_same_outputs_and_sharing(tmp_path):
    from optistack.checkpoints.loadables import load_model
    from optistack.core.persist import save_model

    base = tiny_llama(vocab_size=200, tie_word_embeddings=True)
    model = apply(int8_head(copy.deepcopy(base)), "embed-int8").model

    class Step:
        status, pass_name, text, config, info = "applied", "embed-int8", "embed-int8", {}, {}

    save_model(tmp_path / "m", model, base, [Step()], {})
    loaded = load_model(tmp_path / "m")
    loaded.lm_head.use_kernel("torch")  # load puts an int8 head on the C++ kernel where it builds; compare like with like
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.get_input_embeddings().qweight.data_ptr() == loaded.get_output_embeddings().qweight.data_ptr()


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels"))


@pytest.mark.parametrize("tie", [False, True])
def test_the_engine_reads_the_int8_rows_with_the_models_numbers(tie):
    from optistack.kernels import cpu
    from optistack.kernels.build import cpu_flags

    if not cpu.available() or "avx512_vnni" not in cpu_flags():
        pytest.skip("the decode engine needs the C++ CPU kernels and AVX512-VNNI")
    from test_llama_engine import quantized, tiny

    from optistack.generation import greedy_decode

    model = quantized(tiny(tie_word_embeddings=tie), "rtn-int4{head=int8},embed-int8,fuse-kernels,"
                                                     "decode-engine{act=int16,check_prompts=0}")
    weights = model.optistack_decode.weights
    emb = model.get_input_embeddings()
    assert weights.embed is emb.qweight and weights.embed.dtype == torch.int8  # read in place, not a float copy
    assert torch.equal(weights.embed_s, emb.scale)
    prompt = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    # the exact mode: the engine's tokens are the quantized model's own
    assert torch.equal(greedy_decode(model, prompt, 12).tokens, greedy_decode(model, prompt, 12, use_strategy=False).tokens)
    spec = weights.spec()
    spec.embed_s = torch.empty(0)
    with pytest.raises(RuntimeError, match="embed_s"):
        cpu.lib().LlamaEngine(spec, torch.zeros(8, 32), torch.zeros(8, 32), torch.zeros(2, 1, 1, 8, 64),
                              torch.zeros(2, 1, 1, 8, 64), torch.empty(0), torch.empty(0), 8, 4)
