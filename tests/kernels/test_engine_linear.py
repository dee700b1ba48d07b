"""One copy of the weights: after `decode-engine` the model's int4 projections are views of the engine's
matrices (`EngineInt4Linear`), their forward runs the engine's kernels (`q4_linear`), and the model
computes what it computed before within the kernels' activation rounding."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from optistack.kernels import cpu
from optistack.kernels.build import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
from test_llama_engine import quantized, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available() or "avx512_vnni" not in cpu_flags(),
                                reason="the decode engine needs the C++ CPU kernels and AVX512-VNNI")


def engine_layout(codes, scale, zero, group):
    from optistack.kernels.llama_engine import _units

    return _units(codes, scale, zero, group)


@pytest.mark.parametrize("scales", ["float32", "float16"])
@pytest.mark.parametrize("rows,path", [(1, 0), (3, 0), (9, 1), (40, 0), (40, 2), (1, 3), (9, 3), (40, 3), (1, 4), (8, 4),
                                       (9, 4), (11, 4), (40, 4)])
def test_q4_linear_against_a_float_reference(rows, path, scales):
    """The reference dequantizes codes * scale + zero on the original group grid: independent of the
    engine's packing. int16 activations keep ~15 bits, int8 ~7, bf16 8."""
    if path in (2, 3) and not cpu.lib().amx_supported():
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(rows)
    n, k, group = 40, 320, 64 if path else 128
    if k % group:
        k = 384
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.005
    zero = (torch.rand(n, k // group, generator=g) - 0.5) * 0.2
    q, s, zc = engine_layout(codes, scale, zero, group)
    if scales == "float16":
        s, zc = s.half(), zc.half()
    w = codes.float().reshape(n, -1, 64) * s.float()[..., None] + zc.float()[..., None]
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    want = x @ w.reshape(n, k).T + bias
    got = cpu.lib().q4_linear(x, q, s, zc, bias, path)
    tol = {0: 2e-4, 1: 2e-2, 2: 1e-2, 3: 2e-2, 4: 2e-2}[path]
    if path in (3, 4):  # AMX int8 tiles, the chunk GEMM: the VNNI int8 path's codes and integer products, float
        # sums in another order
        assert torch.allclose(got, cpu.lib().q4_linear(x, q, s, zc, bias, 1), rtol=1e-5, atol=1e-4)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= tol * float(want.abs().max())


def test_q4_linear_refuses_mismatched_sizes():
    q, s, zc = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8"):
        cpu.lib().q4_linear(torch.randn(2, 128), q, s, zc, torch.empty(0), 0)
    with pytest.raises(RuntimeError, match="scales and zc"):
        cpu.lib().q4_linear(torch.randn(2, 64), q, s.half(), zc, torch.empty(0), 0)
    with pytest.raises(RuntimeError, match="bias"):
        cpu.lib().q4_linear(torch.randn(2, 64), q, s, zc, torch.ones(3), 0)
    with pytest.raises(RuntimeError, match="path"):
        cpu.lib().q4_linear(torch.randn(2, 64), q, s, zc, torch.empty(0), 7)


def _storages(model) -> dict[int, int]:
    """data_ptr -> bytes of every storage the model and its engine hold."""
    seen = {}
    tensors = [*model.parameters(), *model.buffers()]
    w = model.optistack_decode.weights
    tensors += [w.embed, w.head_q, w.head_s] + [t for b in w.blocks for p in (b.qkv, b.o, b.gate_up, b.down)
                                                 for t in (p.q, p.s, p.zc)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return seen


@pytest.fixture(scope="module")
def base():
    return tiny(hidden=192, inter=320, heads=3, kv=1)


@pytest.mark.parametrize("chain", ["rtn-int4{head=int8},fuse-kernels", "rtn-int4{head=int8}"])
def test_the_model_shares_the_engine_weights_and_computes_the_same(base, chain):
    from optistack.kernels.engine_linear import EngineInt4Linear

    before = quantized(base, chain)
    shared = quantized(before, "decode-engine{check_prompts=0,act=int16,share_weights=yes}")
    separate = quantized(before, "decode-engine{check_prompts=0,act=int16}")  # auto: kept in the exact mode
    engine_ptrs = {t.untyped_storage().data_ptr() for b in shared.optistack_decode.weights.blocks
                   for p in (b.qkv, b.o, b.gate_up, b.down) for t in (p.q, p.s, p.zc)}
    lins = [m for m in shared.modules() if isinstance(m, EngineInt4Linear)]
    assert len(lins) == 2 * (4 + (2 if "fuse" in chain else 3))
    assert all(m.q.untyped_storage().data_ptr() in engine_ptrs for m in lins)
    assert not any(isinstance(m, EngineInt4Linear) for m in separate.modules())
    held_shared, held_separate = sum(_storages(shared).values()), sum(_storages(separate).values())
    int4_bytes = sum(m.q.nbytes + m.s.nbytes + m.zc.nbytes for m in lins)
    assert held_separate - held_shared >= 0.9 * int4_bytes  # the int4 modules' copy is gone
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = before(ids).logits, shared(ids).logits
        one_want, one_got = before(ids[:1, :1]).logits, shared(ids[:1, :1]).logits
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())  # many rows: bf16 activations
    # one row: int16 activations here; the fused kernel's float32 ones, Int4Linear's bf16 ones there
    one_tol = 2e-3 if "fuse" in chain else 1e-2
    assert float((one_got - one_want).abs().max()) <= one_tol * float(one_want.abs().max())


def test_exact_mode_tokens_equal_the_models_own_loop_and_a_copy_stays_one_copy(base):
    from optistack.generation import greedy_decode

    model = quantized(quantized(base, "rtn-int4{head=int8},fuse-kernels"),
                      "decode-engine{check_prompts=0,act=int16,share_weights=yes}")
    prompt = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(4))
    engine = greedy_decode(model, prompt, 16).tokens
    assert torch.equal(engine, greedy_decode(model, prompt, 16, use_strategy=False).tokens)
    twin = copy.deepcopy(model)
    assert sum(_storages(twin).values()) == sum(_storages(model).values())
    assert not set(_storages(twin)) & set(_storages(model))
    assert torch.equal(greedy_decode(twin, prompt, 16).tokens, engine)


def test_a_saved_shared_model_loads_and_decodes_the_same(base, tmp_path):
    from optistack.checkpoints.loadables import load_model
    from optistack.core.persist import save_model
    from optistack.generation import greedy_decode

    model = quantized(quantized(base, "rtn-int4{head=int8},fuse-kernels"), "decode-engine{check_prompts=0}")

    def step(name, text, config):
        class Step:
            status, pass_name, info = "applied", name, {}
        Step.text, Step.config = text, config
        return Step()

    save_model(tmp_path / "m", model, base, [
        step("rtn-int4", "rtn-int4{head=int8}", {"head": "int8"}), step("fuse-kernels", "fuse-kernels", {}),
        step("decode-engine", "decode-engine{check_prompts=0}", {"check_prompts": 0})], {})
    loaded = load_model(tmp_path / "m")
    prompt = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy_decode(loaded, prompt, 8).tokens, greedy_decode(model, prompt, 8).tokens)
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, model(prompt).logits)
