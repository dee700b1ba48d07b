"""GPU timings of every Triton and CUDA kernel against torch eager and torch.compile, at SmolLM2
(hidden 576, MLP 1536) and Llama-8B (4096, 14336) shapes, decode (1 row) and prefill (128 rows).

Run on a machine with a CUDA GPU (skipped with the reason elsewhere):
    pytest benchmarks/test_kernels_gpu.py -s        # ~3-5 minutes, most of it torch.compile
Each case first checks the kernel against the reference, then times every implementation with
`triton.testing.do_bench` (median of ~100 ms of runs, L2 flushed between runs). The table is printed at
the end and written to benchmarks/results/kernels_gpu-<gpu>.json (ms, and GB/s of compulsory traffic).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch

from optistack.kernels import cuda as cuda_backend
from optistack.kernels import reference as ref
from optistack.kernels import triton as triton_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none here")

MODELS = {"smollm2": (576, 1536), "llama8b": (4096, 14336)}
ROWS = (1, 128)
DT = torch.bfloat16
RESULTS: list[dict] = []


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def record(kernel: str, shape: str, impls: dict, nbytes: int) -> None:
    for impl, fn in impls.items():
        ms = bench_ms(fn)
        RESULTS.append({"kernel": kernel, "shape": shape, "impl": impl, "ms": round(ms, 5),
                        "GB/s": round(nbytes / ms / 1e6, 1)})


@functools.lru_cache(maxsize=None)
def backends():
    """name -> module for the GPU backends usable here (the reason is recorded once for the others)."""
    out = {}
    for name, mod in (("triton", triton_backend), ("cuda", cuda_backend)):
        check = mod.available()
        if check.ok:
            out[name] = mod
        else:
            RESULTS.append({"kernel": "*", "shape": "*", "impl": name, "skipped": check.reason})
    return out


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    rows = [r for r in RESULTS if "ms" in r]
    print(f"\n{'kernel':<22}{'shape':<26}{'impl':<18}{'ms':>10}{'GB/s':>10}")
    for r in rows:
        print(f"{r['kernel']:<22}{r['shape']:<26}{r['impl']:<18}{r['ms']:>10.4f}{r['GB/s']:>10.1f}")
    for r in RESULTS:
        if "skipped" in r:
            print(f"{r['impl']}: not timed ({r['skipped']})")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    out = Path(__file__).parent / "results" / f"kernels_gpu-{gpu}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    out.write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=1))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(model, rows):
    hidden = MODELS[model][0]
    x, r = torch.randn(rows, hidden, device="cuda", dtype=DT), torch.randn(rows, hidden, device="cuda", dtype=DT)
    w = torch.rand(hidden, device="cuda", dtype=DT) + 0.5
    want = ref.rms_norm(x, w, 1e-5, r)
    fused = compiled(lambda: ref.rms_norm(x, w, 1e-5, r))
    impls = {"torch-eager": lambda: ref.rms_norm(x, w, 1e-5, r), "torch-compile": fused}
    for name, mod in backends().items():
        got = mod.rms_norm(x, w, 1e-5, r)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2)
        impls[name] = (lambda m: lambda: m.rms_norm(x, w, 1e-5, r))(mod)
    record("rms_norm+residual", f"{model} {rows}x{hidden}", impls, nbytes=4 * x.numel() * x.element_size())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rows", ROWS)
def test_swiglu(model, rows):
    mlp = MODELS[model][1]
    g, u = torch.randn(rows, mlp, device="cuda", dtype=DT), torch.randn(rows, mlp, device="cuda", dtype=DT)
    want = ref.swiglu(g, u)
    impls = {"torch-eager": lambda: ref.swiglu(g, u), "torch-compile": compiled(lambda: ref.swiglu(g, u))}
    for name, mod in backends().items():
        torch.testing.assert_close(mod.swiglu(g, u), want, rtol=1e-2, atol=1e-2)
        impls[name] = (lambda m: lambda: m.swiglu(g, u))(mod)
    record("swiglu", f"{model} {rows}x{mlp}", impls, nbytes=3 * g.numel() * g.element_size())


def _int4_case(model: str, proj: str):
    hidden, mlp = MODELS[model]
    return (mlp, hidden) if proj == "up" else (hidden, mlp)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("proj", ["up", "down"])
@pytest.mark.parametrize("rows", (1, 16, 128))
def test_int4_matmul(model, proj, rows):
    n, k = _int4_case(model, proj)
    g = 64 if k == 576 else 128
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, k // g, device="cuda") * 0.02 + 0.005
    zero = torch.randn(n, k // g, device="cuda") * 0.01
    x = torch.randn(rows, k, device="cuda", dtype=DT)
    want = ref.int4_matmul(x, codes, scale, zero, g)
    dense = ref.int4_dequantize(codes, scale, zero, g).to(DT)
    impls = {"torch-bf16-dense": lambda: torch.nn.functional.linear(x, dense),
             "torch-eager-dequant": lambda: ref.int4_matmul(x, codes, scale, zero, g),
             "torch-compile-dequant": compiled(lambda: ref.int4_matmul(x, codes, scale, zero, g))}
    for name, mod in backends().items():
        packed = mod.int4_prepack(codes, scale, zero, g)
        got = mod.int4_matmul_packed(x, packed, g, n, k)
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err < 1e-2, f"{name}: normwise error {err}"
        impls[name] = (lambda m, p: lambda: m.int4_matmul_packed(x, p, g, n, k))(mod, packed)
    record("int4_matmul", f"{model}-{proj} {rows}x{k}->{n} g{g}", impls, nbytes=n * k // 2 + x.numel() * 2)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("proj", ["up", "down"])
@pytest.mark.parametrize("rows", (1, 16, 128))
def test_fp8_scaled_matmul(model, proj, rows):
    n, k = _int4_case(model, proj)
    x = (torch.randn(rows, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    xs, ws = torch.rand(rows, 1, device="cuda") * 0.1, torch.rand(1, n, device="cuda") * 0.1
    want = ref.fp8_scaled_matmul(x, w, xs, ws, DT)
    dense_x, dense_w = (x.float() * xs).to(DT), (w.float() * ws.reshape(-1, 1)).to(DT)
    impls = {"torch-bf16-dense": lambda: torch.nn.functional.linear(dense_x, dense_w),
             "torch-eager": lambda: ref.fp8_scaled_matmul(x, w, xs, ws, DT),
             "torch-compile": compiled(lambda: ref.fp8_scaled_matmul(x, w, xs, ws, DT))}
    if torch.cuda.get_device_capability() >= (8, 9) and k % 16 == 0 and n % 16 == 0:
        def scaled_mm():
            return torch._scaled_mm(x, w.t(), scale_a=xs, scale_b=ws, out_dtype=DT)
        try:
            scaled_mm()
            impls["torch-scaled_mm"] = scaled_mm
        except RuntimeError as exc:  # row-wise scaling has shape/arch limits of its own
            RESULTS.append({"kernel": "fp8_scaled_matmul", "shape": f"{rows}x{k}->{n}", "impl": "torch-scaled_mm",
                            "skipped": str(exc).splitlines()[0][:200]})
    if triton_backend.available().ok:
        got = triton_backend.fp8_scaled_matmul(x, w, xs, ws, DT)
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err < 1e-2, f"triton: normwise error {err}"
        impls["triton"] = lambda: triton_backend.fp8_scaled_matmul(x, w, xs, ws, DT)
    record("fp8_scaled_matmul", f"{model}-{proj} {rows}x{k}->{n}", impls, nbytes=n * k + rows * k)
