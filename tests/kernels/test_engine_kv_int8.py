"""The decode engine's int8 KV cache: against the plain-torch reference with the same rounding, the bytes it
writes against an independent quantization of the float32 cache, its size, and what it refuses."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
import engine_reference as ref  # noqa: E402
from test_llama_engine import close_rows, quantized, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


@pytest.fixture(scope="module")
def weights():
    from optistack.kernels.llama_engine import EngineWeights

    return EngineWeights.from_model(quantized(tiny(heads=4, kv=2, hidden=256)))


@pytest.mark.parametrize("act_bits", [8, 16])
def test_int8_cache_decodes_as_its_reference(weights, act_bits):
    """Three slots at staggered positions, prompt chunks then decode steps: logits as the reference that keeps
    every key and value rounded to int8 with one scale a vector."""
    rt = weights.runtime(3, 40, act_bits, kv="int8")
    cos, sin = weights.rope_tables(40)
    shape = rt.k_cache.shape
    kc, vc = torch.zeros(shape), torch.zeros(shape)
    g = torch.Generator().manual_seed(3)
    for b in range(3):
        n = 4 + 5 * b
        rows = (torch.randint(0, 300, (n,), generator=g), torch.full((n,), b), torch.arange(n))
        rt.forward(*rows, torch.arange(0))
        ref.forward(weights, *rows, kc, vc, cos, sin, act_bits, kv_int8=True)
    tok, slots = torch.randint(0, 300, (3,), generator=g), torch.arange(3)
    for step in range(5):
        pos = torch.tensor([4, 9, 14]) + step
        got = rt.forward(tok, slots, pos, torch.arange(3))
        want = ref.forward(weights, tok, slots, pos, kc, vc, cos, sin, act_bits, kv_int8=True)
        ok, err = close_rows(got, want, 2e-3 if act_bits == 8 else 1e-3)
        assert ok, (step, err)
        tok = want.argmax(-1)


def test_int8_cache_holds_the_float_cache_rounded_to_int8(weights):
    """The first layer's keys and values do not depend on the cache type (later layers read the rounded cache):
    there the int8 cache's codes and scales are those of the float32 cache's vectors, quantized here
    independently of the engine."""
    prompt = (torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(4)), torch.zeros(17, dtype=torch.long),
              torch.arange(17))
    f32 = weights.runtime(1, 24, 16, kv="float32")
    i8 = weights.runtime(1, 24, 16, kv="int8")
    for rt in (f32, i8):
        rt.forward(*prompt, torch.arange(0))
    for cache, codes, scales in ((f32.k_cache, i8.k_cache, i8.k_scale), (f32.v_cache, i8.v_cache, i8.v_scale)):
        x = cache[0, :, :, :17].double()
        amax = x.abs().amax(-1)
        assert torch.allclose(scales[0, :, :, :17].double(), amax / 127, rtol=1e-6)
        want = torch.round(x / (amax / 127).unsqueeze(-1))
        assert (codes[0, :, :, :17].double() - want).abs().max() <= 1  # a division's last bit may round the other way
        assert (codes[0, :, :, :17].double() != want).float().mean() < 1e-3
        assert codes.dtype == torch.int8 and int(codes[:, :, :, 17:].abs().sum()) == 0
        assert (codes[1, :, :, :17].double() - torch.round(cache[1, :, :, :17].double() / scales[1, :, :, :17, None])
                ).abs().max() <= 3  # the second layer: close, not equal (it attended over rounded keys)


def test_int8_cache_takes_about_half_the_bytes_of_float16(weights):
    f16, i8 = weights.runtime(1, 8), weights.runtime(1, 8, kv="int8")
    d = weights.dims
    assert f16.kv_bytes_per_token == d.layers * 2 * d.kv_heads * d.head_dim * 2
    assert i8.kv_bytes_per_token == d.layers * 2 * d.kv_heads * (d.head_dim + 4)
    held = sum(t.numel() * t.element_size() for t in (i8.k_cache, i8.v_cache, i8.k_scale, i8.v_scale))
    assert held == i8.kv_bytes_per_token * 8


def test_load_cache_into_an_int8_cache_continues_like_the_float_cache(weights):
    """A transformers cache copied in (the model's own prefill) is quantized on the way: the next step's logits
    stay within int8 rounding of the float16 engine's."""
    from transformers import DynamicCache

    model = quantized(tiny(heads=4, kv=2, hidden=256))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    out = []
    for kv in ("float16", "int8"):
        rt = weights.runtime(1, 16, kv=kv)
        rt.load_cache(cache, [0], [12])
        out.append(rt.forward(torch.tensor([7]), torch.tensor([0]), torch.tensor([12]), torch.arange(1)))
    err = float((out[1] - out[0]).norm() / out[0].norm())
    assert 0 < err < 0.02, err


def test_bad_cache_types_are_refused(weights):
    with pytest.raises(ValueError, match="kv must be one of float32, float16, int8"):
        weights.runtime(1, 8, kv="int4")
    spec, (cos, sin) = weights.spec(), weights.rope_tables(8)
    d = weights.dims
    codes = torch.zeros(d.layers, 1, d.kv_heads, 8, d.head_dim, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="k_scale"):
        cpu.lib().LlamaEngine(spec, cos, sin, codes, codes.clone(), torch.zeros(3), torch.zeros(3), 8, 16)
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        cpu.lib().LlamaEngine(spec, cos, sin, codes, codes.float(), torch.zeros(0), torch.zeros(0), 8, 16)
