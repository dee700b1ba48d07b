"""pytest-benchmark: the C++ CPU kernels (backend cpu-cpp) against eager torch, side by side.

Run: `pytest benchmarks/test_kernels_cpu.py --benchmark-only` (2 threads, as the issue's bars are set on
2 cores). Each group holds one kernel at one shape, eager torch and ours, so the ratio reads directly:
- rmsnorm: transformers' LlamaRMSNorm forward vs FusedRMSNorm's kernel, 1 and 128 rows;
- swiglu: F.silu(gate) * up vs the fused kernel;
- int4: torch._weight_int4pack_mm_for_cpu (bf16 activations, as Int4Linear calls it) vs our GEMV
  (M = 1, decode) and small GEMM (M = 16, 128: prefill), group size 64. The cpu-cpp int4 entries also
  carry `interleaved_ratio_vs_torch` in extra_info: torch's and our kernel timed in alternating blocks.
- int8 head: float32 F.linear vs torch._weight_int8pack_mm vs our int8 GEMV (the lm_head of
  `head=int8`), 1/4/8 rows; SmolLM2's head (576 -> 49152) and a Llama-3-8B-sized one (4096 -> 128256).
Shapes: SmolLM2 (hidden 576, MLP 1536, vocab 49152) and Llama-8B (4096, 14336).
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from optistack.kernels import cpu
from optistack.layers.int4 import Int4Linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NORM_SHAPES = [(1, 576), (128, 576), (1, 4096), (128, 4096)]
SWIGLU_SHAPES = [(1, 1536), (128, 1536), (1, 14336), (128, 14336)]
INT4_SHAPES = [(1, 576, 1536), (1, 1536, 576), (1, 576, 576), (1, 576, 49152), (1, 4096, 14336),
               (1, 14336, 4096), (16, 576, 1536), (128, 576, 1536)]


@pytest.fixture(scope="module", autouse=True)
def setup():
    if not cpu.available():
        pytest.skip(f"cpu-cpp unavailable: {cpu.available().reason}")
    cpu.ensure_built()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def run(benchmark, fn, group, impl, calls):
    for _ in range(3):
        fn()
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(lambda: [fn() for _ in range(calls)], rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["eager", "cpu-cpp"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
def test_rmsnorm(benchmark, impl, dtype, rows, hidden):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden).to(DTYPES[dtype])
    x = torch.randn(rows, hidden, dtype=DTYPES[dtype])
    lib = cpu.lib()
    fn = (lambda: norm(x)) if impl == "eager" else (lambda: lib.rms_norm(x, norm.weight, 1e-6))
    with torch.inference_mode():
        run(benchmark, fn, f"rmsnorm {dtype} {rows}x{hidden}", impl, max(1, 20000 // (rows * hidden // 64 + 1)))


@pytest.mark.parametrize("impl", ["eager", "cpu-cpp"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,inter", SWIGLU_SHAPES)
def test_swiglu(benchmark, impl, dtype, rows, inter):
    gate, up = torch.randn(rows, inter, dtype=DTYPES[dtype]), torch.randn(rows, inter, dtype=DTYPES[dtype])
    lib = cpu.lib()
    fn = (lambda: F.silu(gate) * up) if impl == "eager" else (lambda: lib.swiglu(gate, up))
    with torch.inference_mode():
        run(benchmark, fn, f"swiglu {dtype} {rows}x{inter}", impl, max(1, 20000 // (rows * inter // 64 + 1)))


def interleaved_ratio(torch_fn, our_fn, calls, pairs=15):
    """Median over pairs of (torch block time / our block time), the two blocks run back to back.
    The groups above time each kernel on its own, seconds apart; on a shared machine the speed of
    memory drifts over seconds, so this ratio is the steadier one (and, as the kernels evict each
    other's weights from L3, it is the memory-bound case that decode is)."""
    def block(fn):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start
    for _ in range(2):
        block(torch_fn), block(our_fn)
    return statistics.median(block(torch_fn) / block(our_fn) for _ in range(pairs))


@pytest.mark.parametrize("impl", ["torch-int4pack", "cpu-cpp"])
@pytest.mark.parametrize("m,k,n", INT4_SHAPES)
def test_int4_matmul(benchmark, impl, m, k, n):
    group = 64
    lin = torch.nn.Linear(k, n, bias=False)
    q = Int4Linear.from_linear(lin, group)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    theirs = lambda: torch._weight_int4pack_mm_for_cpu(x, q.qweight, group, q.scales_and_zeros)  # noqa: E731
    if impl == "torch-int4pack":
        fn = theirs
    else:
        sz = q.scales_and_zeros.float()
        p = cpu.int4_prepack(q.codes(), sz[..., 0].t(), sz[..., 1].t(), group)
        lib = cpu.lib()
        fn = lambda: lib.int4_matmul(x, p["qweight"], p["scale"], p["zero"], group)  # noqa: E731
    benchmark.extra_info["weight_MB"] = n * k / 2 / 1e6
    calls = max(1, 2_000_000 // (m * n * k // 64 + 1))
    with torch.inference_mode():
        run(benchmark, fn, f"int4 M={m} {k}->{n}", impl, calls)
        if impl == "cpu-cpp":
            benchmark.extra_info["interleaved_ratio_vs_torch"] = round(interleaved_ratio(theirs, fn, calls), 3)


INT8_HEAD_SHAPES = [(1, 576, 49152), (4, 576, 49152), (8, 576, 49152), (1, 4096, 128256)]


@pytest.mark.parametrize("impl", ["fp32-linear", "torch-int8pack", "cpu-cpp"])
@pytest.mark.parametrize("m,k,n", INT8_HEAD_SHAPES)
def test_int8_head(benchmark, impl, m, k, n):
    """The lm_head: float32 F.linear (what `head=keep` runs), torch's int8 weight-only kernel
    (`_weight_int8pack_mm`, bf16 activations) and ours (float32 activations, int16 inside)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    xb, sb = x.bfloat16(), s.bfloat16()
    theirs = lambda: torch.ops.aten._weight_int8pack_mm(xb, q, sb)  # noqa: E731
    if impl == "fp32-linear":
        w = q.float() * s.unsqueeze(1)
        fn = lambda: F.linear(x, w)  # noqa: E731
    elif impl == "torch-int8pack":
        fn = theirs
    else:
        lib = cpu.lib()
        fn = lambda: lib.int8_matmul(x, q, s)  # noqa: E731
    benchmark.extra_info["weight_MB"] = n * k / 1e6
    calls = max(1, 200_000_000 // (n * k))
    with torch.inference_mode():
        run(benchmark, fn, f"int8 head M={m} {k}->{n}", impl, calls)
        if impl == "cpu-cpp":
            benchmark.extra_info["interleaved_ratio_vs_torch"] = round(interleaved_ratio(theirs, fn, calls), 3)
