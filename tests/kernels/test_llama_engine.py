"""The C++ decode engine against its plain-torch reference (engine_reference.py), and what it refuses."""
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

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def tiny(kind: str = "llama", hidden: int = 192, inter: int = 320, layers: int = 2, heads: int = 3, kv: int = 1,
         **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=300, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                  max_position_embeddings=256, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_mlp_bias(layers: int = 2):
    """tiny() with MLP biases drawn from N(0, 0.5) (zero-initialized ones would test nothing)."""
    model = tiny(layers=layers, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.bias.normal_(0, 0.5)
    return model


def quantized(model, chain: str = "rtn-int4{head=int8},fuse-kernels"):
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    return Pipeline.parse(chain).apply(copy.deepcopy(model), PassContext()).model


@pytest.mark.parametrize("n,k", [(7, 576), (12, 4160), (8, 128), (3, 64)])
def test_int4_unpack_inverts_prepack(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = cpu.int4_prepack(codes, torch.rand(n, k // 64), torch.rand(n, k // 64), 64)
    assert torch.equal(cpu.int4_unpack(packed["qweight"], n, k), codes)


def fresh_caches(rt):
    return torch.zeros_like(rt.k_cache), torch.zeros_like(rt.v_cache)


def replayed(rt, amx_batch, history, weights, cos, sin):
    """`rt` with `amx_batch` set, and fresh reference caches, both after the calls of `history` (no logits)."""
    rt.impl.amx_batch = amx_batch
    kc, vc = fresh_caches(rt)
    for rows in history:
        rt.forward(*rows, torch.arange(0))
        ref.forward(weights, *rows, kc, vc, cos, sin)
    return rt, kc, vc


def close_rows(got, want, tight, loose=1e-2):
    """Per-row relative error: a 1-ulp input difference may flip the rounding of one quantized activation
    (an int8 code moves a row by ~0.5%, and the flipped key stays in the cache), so a third of the rows
    may sit above the tight bar, none above `loose` (a wrong row, position or head is off by tens of %)."""
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    return bool(err.max() < loose) and int((err > tight).sum()) <= max(1, len(err) // 3), err.tolist()


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("chain", ["rtn-int4{head=int8},fuse-kernels", "rtn-int4{group_size=128}"])
def test_engine_matches_its_reference(batch, chain, act_bits):
    """Odd unit counts (192 = 3 units, 320 = 5), grouped-query heads, fused and unfused layers; every slot
    at its own position (slot b starts b positions later); batch 7 takes the GEMM's pairs of activation
    rows three times, then its single row."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(), chain))
    rt = weights.runtime(batch, 24, act_bits)
    cos, sin = weights.rope_tables(24)
    kc, vc = fresh_caches(rt)
    slots = torch.arange(batch)
    tight = 1e-3 if act_bits == 8 else 1e-4
    g = torch.Generator().manual_seed(1)
    for b in range(batch):  # stagger the slots: slot b holds b positions before the steps start
        if b:
            prompt = torch.randint(0, 300, (b,), generator=g)
            rows = (prompt, torch.full((b,), b), torch.arange(b))
            rt.forward(*rows, torch.arange(0))
            ref.forward(weights, *rows, kc, vc, cos, sin, act_bits)
    tok = torch.randint(0, 300, (batch,), generator=g)
    for step in range(6):
        pos = slots + step
        got = rt.forward(tok, slots, pos, torch.arange(batch))
        want = ref.forward(weights, tok, slots, pos, kc, vc, cos, sin, act_bits)
        ok, err = close_rows(got, want, tight)
        assert ok, (step, err)
        tok = want.argmax(-1)
    rows_close = [torch.allclose(rt.k_cache[:, b].float(), kc[:, b].float(), rtol=2e-3, atol=1e-4) for b in range(batch)]
    assert rows_close.count(False) <= batch // 3 and torch.allclose(rt.k_cache.float(), kc.float(), atol=2e-2)


@pytest.mark.parametrize("act_bits", [8, 16])
def test_prompt_chunks_decode_rows_and_drafts_mix_in_one_call(act_bits):
    """One call holding a 5-token prompt chunk of slot 2, a decode row of slot 0 and 3 draft rows of slot 1
    gives each row what the reference gives it."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny()))
    rt = weights.runtime(3, 32, act_bits)
    cos, sin = weights.rope_tables(32)
    kc, vc = fresh_caches(rt)
    g = torch.Generator().manual_seed(2)
    first = (torch.randint(0, 300, (7,), generator=g), torch.tensor([0] * 4 + [1] * 3), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    rt.forward(*first, torch.arange(0))
    ref.forward(weights, *first, kc, vc, cos, sin, act_bits)
    mixed = (torch.randint(0, 300, (9,), generator=g), torch.tensor([2] * 5 + [0] + [1] * 3),
             torch.tensor([0, 1, 2, 3, 4, 4, 3, 4, 5]))
    got = rt.forward(*mixed, torch.arange(9))
    want = ref.forward(weights, *mixed, kc, vc, cos, sin, act_bits)
    ok, err = close_rows(got, want, 1e-3 if act_bits == 8 else 1e-4)
    assert ok, err
    assert [rt.filled(s) for s in range(3)] == [5, 6, 5]


@pytest.mark.parametrize("act_bits", [8, 16])
def test_a_row_computes_the_same_alone_batched_chunked_and_on_any_thread_count(act_bits):
    """Bitwise: a sequence decoded one row per call, as one chunk, beside other rows, or with 1 or 3 threads
    gets the same logits (every row runs the same instructions whatever shares its call)."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny()))
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(4))

    def alone(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        rt = weights.runtime(1, 16, act_bits)
        return torch.cat([rt.forward(ids[i:i + 1], torch.tensor([0]), torch.tensor([i]), torch.tensor([0]))
                          for i in range(9)])

    before = torch.get_num_threads()
    try:
        one_by_one = alone(1)
        assert torch.equal(alone(3), one_by_one)
    finally:
        torch.set_num_threads(before)
    rt = weights.runtime(2, 16, act_bits)
    chunk = rt.forward(ids, torch.zeros(9, dtype=torch.long), torch.arange(9), torch.arange(9))
    assert torch.equal(chunk, one_by_one)
    rt2 = weights.runtime(2, 16, act_bits)
    rt2.forward(other[:4], torch.ones(4, dtype=torch.long), torch.arange(4), torch.arange(0))
    rows = torch.cat([ids[:5], other[4:7]]), torch.tensor([0] * 5 + [1] * 3), torch.tensor([0, 1, 2, 3, 4, 4, 5, 6])
    assert torch.equal(rt2.forward(*rows, torch.arange(5)), one_by_one[:5])


def test_engine_serves_qwen2_with_projection_bias():
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny("qwen2")))
    assert weights.blocks[0].qkv.bias.numel() == (3 + 2) * 64  # the qkv bias made it into the engine
    rt = weights.runtime(1, 8)
    cos, sin = weights.rope_tables(8)
    kc, vc = fresh_caches(rt)
    tok = torch.tensor([5])
    for pos in range(4):
        rows = tok, torch.tensor([0]), torch.tensor([pos])
        got, want = rt.forward(*rows, torch.tensor([0])), ref.forward(weights, *rows, kc, vc, cos, sin)
        assert ((got - want).norm() / want.norm()) < 1e-4
        tok = want.argmax(-1)


@pytest.mark.parametrize("act_bits,tolerance", [(8, 0.05), (16, 1e-3)])
def test_engine_follows_the_model_within_its_activation_error(act_bits, tolerance):
    """Against the model's own float32 decode step (not the reference): the logits stay close."""
    from transformers import DynamicCache

    from optistack.kernels.llama_engine import EngineWeights

    model = quantized(tiny(layers=1))
    rt = EngineWeights.from_model(model).runtime(1, 32, act_bits)
    ids = torch.randint(0, 300, (1, 6))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        rt.load_cache(cache, [0], [6])
        for i in range(4):
            got = rt.forward(tok, torch.tensor([0]), torch.tensor([6 + i]), torch.tensor([0]))
            want = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            assert ((got - want).norm() / want.norm()) < tolerance
            tok = want.argmax(-1)


def test_forward_refuses_bad_rows_with_one_clear_error():
    from optistack.kernels.llama_engine import EngineWeights

    rt = EngineWeights.from_model(quantized(tiny(layers=1))).runtime(2, 8)
    impl, t = rt.impl, torch.tensor
    with pytest.raises(RuntimeError, match="position 8 outside 0..7"):
        impl.forward(t([1]), t([0]), t([8]), t([0]))
    with pytest.raises(RuntimeError, match="token id 300 outside"):
        impl.forward(t([1, 300]), t([0, 1]), t([0, 0]), t([0]))
    with pytest.raises(RuntimeError, match="slot 2 outside 0..1"):
        impl.forward(t([1]), t([2]), t([0]), t([0]))
    with pytest.raises(RuntimeError, match="only 0 positions are filled"):
        impl.forward(t([1]), t([0]), t([3]), t([0]))
    with pytest.raises(RuntimeError, match="consecutive positions"):
        impl.forward(t([1, 2]), t([0, 0]), t([0, 2]), t([0]))
    with pytest.raises(RuntimeError, match="not adjacent"):
        impl.forward(t([1, 2, 3]), t([0, 1, 0]), t([0, 0, 1]), t([0]))
    with pytest.raises(RuntimeError, match="logit row 2 outside"):
        impl.forward(t([1, 2]), t([0, 1]), t([0, 0]), t([2]))
    with pytest.raises(RuntimeError, match="3 logit rows for 2 rows"):
        impl.forward(t([1, 2]), t([0, 1]), t([0, 0]), t([0, 1, 1]))
    with pytest.raises(RuntimeError, match="one value per row"):
        impl.forward(t([1, 2]), t([0]), t([0, 0]), t([0]))
    with pytest.raises(RuntimeError, match="must hold integers"):
        impl.forward(t([1.0]), t([0]), t([0]), t([0]))
    with pytest.raises(ValueError, match="slot 1 is not in use"):
        rt.release([1])
    assert [rt.filled(s) for s in range(2)] == [0, 0]  # nothing above changed the cache's state


def test_more_threads_after_building_the_engine_is_safe_and_changes_nothing():
    """The attention scratch was once sized by the thread count at build time: raising torch's threads
    afterwards overflowed the heap (malloc: smallbin double linked list corrupted)."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(layers=1)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rt = weights.runtime(1, 64)
        ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5))
        want = rt.forward(ids, torch.zeros(40, dtype=torch.long), torch.arange(40), torch.arange(40))
        torch.set_num_threads(8)
        got = rt.forward(ids, torch.zeros(40, dtype=torch.long), torch.arange(40), torch.arange(40))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


def test_concurrent_callers_on_their_own_slots_get_what_they_get_alone():
    import threading

    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(layers=1)))
    prompts = [torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]

    def decode(rt, slot, ids):
        return rt.forward(ids, torch.full((12,), slot), torch.arange(12), torch.arange(12))

    alone = [decode(weights.runtime(1, 16), 0, p) for p in prompts]
    shared = weights.runtime(4, 16)
    got: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, decode(shared, i, prompts[i]))) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(got[i], alone[i]) for i in range(4))


def test_unsupported_says_why():
    from optistack.kernels.llama_engine import unsupported

    assert "apply awq or rtn-int4 first" in unsupported(tiny())
    assert "multiples of 64" in unsupported(quantized(tiny(), "rtn-int4{group_size=32}"))
    from transformers import GPT2Config, GPT2LMHeadModel

    assert "gpt2" in unsupported(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=50)))
    assert unsupported(quantized(tiny())) is None


@pytest.mark.skipif(not cpu.available() or not cpu.lib().amx_supported(), reason="needs AMX tiles")
@pytest.mark.parametrize("rows,bias", [(32, False), (45, False), (70, False), (45, True)])
def test_prompt_chunks_on_amx_tiles_match_the_reference_and_the_vnni_path(rows, bias):
    """A slot's chunk of >= 32 rows runs its projections on AMX tiles: partial tiles of activation rows
    (45, 70) and of weight rows (qkv has 5 heads x 64 = 320 rows: 20 tiles; gate_up 640, its SwiGLU fused
    into the tile epilogue, biases included with `mlp_bias`), beside decode rows of another slot on the VNNI
    path in the same call."""
    from optistack.kernels.llama_engine import EngineWeights

    model = tiny_mlp_bias() if bias else tiny(layers=2)
    weights = EngineWeights.from_model(quantized(model))
    ids = torch.randint(0, 300, (rows,), generator=torch.Generator().manual_seed(rows))
    mixed = (torch.cat([torch.tensor([7]), ids]), torch.tensor([1] + [0] * rows),
             torch.cat([torch.tensor([0]), torch.arange(rows)]))
    cos, sin = weights.rope_tables(96)
    rt = weights.runtime(2, 96)
    assert rt.impl.amx_rows == 32
    kc, vc = fresh_caches(rt)
    got = rt.forward(*mixed, torch.arange(rows + 1))
    want = ref.forward(weights, *mixed, kc, vc, cos, sin, amx_rows=32)
    ok, err = close_rows(got, want, 1e-3)
    assert ok, err
    vnni = weights.runtime(2, 96)
    vnni.impl.amx_rows = 0
    other = vnni.forward(*mixed, torch.arange(rows + 1))
    assert torch.equal(got[0], other[0])  # the decode row took the VNNI path in both
    # the chunk's rows: bf16 activations and weights against int8 activations per 64 channels
    assert ((got - other).norm(dim=-1) / other.norm(dim=-1)).max() < 5e-2


@pytest.mark.skipif(not cpu.available() or not cpu.lib().amx_supported(), reason="needs AMX tiles")
@torch.no_grad()
def test_with_amx_batch_decode_rows_join_a_prompt_chunk_on_bf16_tiles():
    """amx_batch on (a server's batches): three decode rows of other slots in a call with a 40-row prompt chunk
    run on the chunk's bf16 tiles; without amx_batch they keep the VNNI path. Each is checked against its
    reference and, for the decode rows, away from the other path's (int8 against bf16 activations)."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(layers=2)))
    cos, sin = weights.rope_tables(64)
    g = torch.Generator().manual_seed(40)
    history = [(torch.randint(0, 300, (b + 2,), generator=g), torch.full((b + 2,), b + 1), torch.arange(b + 2))
               for b in range(3)]
    call = (torch.randint(0, 300, (43,), generator=g), torch.tensor([1, 2, 3] + [0] * 40),
            torch.cat([torch.arange(3) + 2, torch.arange(40)]))
    for batch in (0, 8):
        rt, kc, vc = replayed(weights.runtime(4, 64), batch, history, weights, cos, sin)
        got = rt.forward(*call, torch.arange(43))
        head = 8 if batch else 16  # 43 logit rows >= amx_batch: the head's rows as int8 on AMX tiles
        want, other = (ref.forward(weights, *call, kc.clone(), vc.clone(), cos, sin, amx_rows=32, amx_batch=b,
                                   head_bits=head) for b in (batch, 8 - batch))
        ok, err = close_rows(got, want, 1e-3, loose=2e-2)  # an int8 head row: up to ~1% from one code
        assert ok, (batch, err)
        apart = (got[:3] - other[:3]).norm(dim=-1) / other[:3].norm(dim=-1)
        assert float(apart.min()) > 2e-3, (batch, apart.tolist())


def test_amx_rows_is_refused_where_it_cannot_run():
    from optistack.kernels.llama_engine import EngineWeights

    rt = EngineWeights.from_model(quantized(tiny(layers=1))).runtime(1, 8, act_bits=16)
    assert rt.impl.amx_rows == 0  # int16 activations never take AMX tiles
    with pytest.raises(RuntimeError, match="amx_rows must be >= 0"):
        rt.impl.amx_rows = -1
    if cpu.lib().amx_supported():
        with pytest.raises(RuntimeError, match="int16 activations"):
            rt.impl.amx_rows = 32


@pytest.mark.skipif(not cpu.available() or not cpu.lib().amx_supported(), reason="needs AMX tiles")
@pytest.mark.parametrize("panels", [False, True])
def test_a_batch_of_decode_rows_on_amx_tiles_matches_the_reference(panels):
    """amx_batch=8: nine slots' decode rows (one each, each at its own position) take the int8 tiles together:
    the same int8 codes and exact integer products as the VNNI path, the float sums in another order; the
    head takes them as int8 rows on AMX tiles too (V = 300: 18 tiles of 16 rows and a VNNI tail of 12). With
    panels (a server's default) the rows read the panels instead and only the head takes the tiles: the
    keys and values they write are then those of the same rows on panels without amx_batch, bit for bit."""
    from optistack.kernels.llama_engine import EngineWeights

    weights = EngineWeights.from_model(quantized(tiny(layers=2)))
    cos, sin = weights.rope_tables(32)
    g = torch.Generator().manual_seed(9)
    history = [(torch.randint(0, 300, (b + 1,), generator=g), torch.full((b + 1,), b), torch.arange(b + 1))
               for b in range(9)]  # slot b holds b + 1 positions
    step = torch.randint(0, 300, (9,), generator=g), torch.arange(9), torch.arange(9) + 1
    caches = {}
    for batch in (8, 0):
        rt, kc, vc = replayed(weights.runtime(9, 32, panels=panels), batch, history, weights, cos, sin)
        got = rt.forward(*step, torch.arange(9))
        caches[batch] = rt.k_cache.clone(), rt.v_cache.clone()
        # a batch of >= amx_batch: the AMX int8 head (its rows as int8 with one scale a row)
        want = ref.forward(weights, *step, kc, vc, cos, sin, head_bits=8 if batch else 16)
        ok, err = close_rows(got, want, 1e-3, loose=2e-2)  # one int8 code of the head's row moves a row by up to ~1%
        assert ok, (batch, err)
    same = all(torch.equal(a, b) for a, b in zip(caches[8], caches[0]))
    assert same is panels  # panels: the projections took the panels either way; else tiles against VNNI rows
    with pytest.raises(RuntimeError, match="amx_batch must be >= 0"):
        rt.impl.amx_batch = -1
