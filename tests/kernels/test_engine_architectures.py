"""Architectures beyond Llama on the decode engine, against the plain-torch reference and the model's own
forward: Qwen3 (each query and key head RMS-normalized before RoPE, heads that do not add up to the hidden
size: Qwen3-0.6B's 16 x 128 over 1024) and SmolLM3 (layers without RoPE); and the per-head norms or layer
kinds the engine does not compute, refused by name."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
import engine_reference as ref  # noqa: E402
from test_llama_engine import quantized, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def tiny_qwen3(layers: int = 2, **extra):
    """hidden 256 with 4 query heads of 128 (512 wide) and 2 key/value heads; q_norm and k_norm weights drawn
    around 1 (the ones they start as would not tell a missing weight from a present one)."""
    model = tiny("qwen3", hidden=256, inter=384, layers=layers, heads=4, kv=2, head_dim=128, **extra)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    return model


def tiny_smollm3(layers: int = 4):
    """Every other layer without RoPE (SmolLM3-3B: every fourth), so a rotation applied or skipped in the wrong
    layer shows."""
    return tiny("smollm3", hidden=192, inter=320, layers=layers, heads=3, kv=1, pad_token_id=0,
                no_rope_layers=[1, 0] * (layers // 2))


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("arch", ["qwen3", "smollm3"])
@torch.no_grad()
def test_prompt_and_decode_rows_match_the_reference(arch, act_bits):
    """A 40-row prompt (a chunk: its rows attend together) in slot 0, a 5-row one in slot 1, then decode
    steps of both; int16 activations within 1e-3 of the reference, int8 ones within 1e-2 (one activation
    code rounding the other way moves a row by ~0.5%; a head normalized with the wrong weight or not at all
    is off by tens of %)."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny_qwen3() if arch == "qwen3" else tiny_smollm3()))
    d = weights.dims
    if arch == "qwen3":
        assert (d.heads * d.head_dim, d.hidden) == (512, 256)
        assert all(b.q_norm.shape == (128,) and b.k_norm.shape == (128,) for b in weights.blocks)
    else:
        assert [b.rope for b in weights.blocks] == [True, False, True, False]
    rt = weights.runtime(2, 64, act_bits=act_bits)
    cos, sin = weights.rope_tables(64)
    kc, vc = torch.zeros_like(rt.k_cache), torch.zeros_like(rt.v_cache)
    g = torch.Generator().manual_seed(8)
    bound = 1e-3 if act_bits == 16 else 1e-2
    for b, n in enumerate((40, 5)):
        rows = (torch.randint(0, 300, (n,), generator=g), torch.full((n,), b), torch.arange(n))
        got = rt.forward(*rows, torch.arange(n))
        want = ref.forward(weights, *rows, kc, vc, cos, sin, act_bits, amx_rows=rt.impl.amx_rows)
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1))
        assert float(err.max()) < (bound if not rt.impl.amx_rows or n < 32 else 2e-2), (b, err.tolist())
    tok = torch.randint(0, 300, (2,), generator=g)
    ref.check_decode_steps(rt, weights, kc, vc, cos, sin, act_bits, [40, 5], tok, 4, bound)


def test_the_reference_is_the_models_own_forward_on_dequantized_weights():
    """The reference (and so the engine) computes what Qwen3's attention does: the quantized model's own
    logits against the reference with int16 activations (15 significant bits), prompt of 12 tokens."""
    from optistack.kernels.llama_engine import EngineWeights

    model = quantized(tiny_qwen3(), "rtn-int4{head=int8}")
    weights = EngineWeights.from_model(model)
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(4))
    cos, sin = weights.rope_tables(16)
    shape = (weights.dims.layers, 1, weights.dims.kv_heads, 16, weights.dims.head_dim)
    want = ref.forward(weights, ids, torch.zeros(12), torch.arange(12), torch.zeros(shape), torch.zeros(shape),
                       cos, sin, act_bits=16)
    head = model.get_output_embeddings()
    with torch.no_grad():
        h = model.model(ids[None]).last_hidden_state[0]
        x = h @ (head.qweight.float() * head.scale.float()[:, None]).T  # the int8 head, dequantized
    # the reference quantizes the head's activations (int16) and the model's int4 layers run in bfloat16
    err = ((want - x).norm(dim=-1) / x.norm(dim=-1))
    assert float(err.max()) < 2e-2, err.tolist()
    assert float((want.argmax(-1) == x.argmax(-1)).float().mean()) >= 0.9


@pytest.mark.parametrize("arch", ["qwen3", "smollm3"])
def test_decode_engine_serves_it_and_generate_gives_its_own_tokens_in_the_exact_mode(arch):
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    quant = quantized(tiny_qwen3() if arch == "qwen3" else tiny_smollm3())
    chain = "decode-engine{act=int16,prefill=model,check_prompts=0}"
    engine = Pipeline.parse(chain).apply(copy.deepcopy(quant), PassContext()).model
    assert engine.optistack_decode is not None
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        got = engine.generate(ids, **kw)
        want = type(quant).generate(quant, ids, **kw)  # the model's own loop
    assert engine.generate.last["session"] == "EngineSession"
    assert torch.equal(got, want), (got[0, 9:].tolist(), want[0, 9:].tolist())


def test_decode_engine_with_int8_activations_passes_its_agreement_check_on_qwen3():
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    out = Pipeline.parse("decode-engine").apply(quantized(tiny_qwen3()), PassContext())
    assert out.model.optistack_decode is not None, out.info


@pytest.mark.parametrize("change,words", [
    ("sliding", "sliding window must be a positive number of positions; it is 0"),
    ("eps", "eps"),
    ("layernorm", "RMSNorm over each head"),
])
def test_what_the_engine_does_not_compute_is_refused_by_name(change, words):
    from optistack.kernels.llama_engine import unsupported

    if change == "sliding":  # a window is served up to its length (tests/generation/test_sliding_window.py)
        from optistack.kernels.llama_engine import EngineWeights

        model = tiny_qwen3(use_sliding_window=True, sliding_window=16, max_window_layers=1)
        assert unsupported(quantized(model, "rtn-int4{head=int8}")) is None
        assert EngineWeights.from_model(quantized(model, "rtn-int4{head=int8}")).max_positions == 16
        model = tiny_qwen3()
        model.model.layers[1].self_attn.sliding_window = 0
    else:
        model = tiny_qwen3()
        attn = model.model.layers[1].self_attn
        if change == "eps":
            attn.k_norm.variance_epsilon = 1e-3
        else:
            attn.q_norm = torch.nn.LayerNorm(128)
    why = unsupported(quantized(model, "rtn-int4{head=int8}"))
    assert why is not None and words in why, why
