"""Triton kernels vs the plain-torch references.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set for
this process before triton is imported, or in a subprocess when something imported triton first),
at tiny shapes, including odd sizes. On a GPU the `gpu` tests run the compiled kernels at SmolLM2 and
Llama-8B shapes. The interpreter rounds float32 -> bfloat16 by truncation (the GPU rounds to
nearest), so bf16 results may differ from the reference by one bf16 step: inside the 1e-2 bar.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton decides compiled vs interpreted when `triton` and each kernel are imported, and reads the
# variable again while interpreting: without CUDA, turn the interpreter on for this process before
# anything imports triton (harmless there: nothing can run compiled Triton on a CPU-only machine).
_SUBPROCESS = "OPTISTACK_TRITON_INTERPRETER_SUBPROCESS"
if not torch.cuda.is_available() and "triton" not in sys.modules and __name__ != "__main__":  # main: --aot below
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton not installed (pip install 'optistack[triton]')")

from optistack.kernels import reference as ref  # noqa: E402
from optistack.kernels import triton as tk  # noqa: E402

LOW = (torch.bfloat16, torch.float16)


def _interpreter_ready() -> bool:
    """TRITON_INTERPRET is on and was on when triton was imported (its own helpers are interpreted)."""
    import triton
    import triton.language as tl

    return tk.interpreter_requested() and not isinstance(tl.sum, triton.runtime.JITFunction)


@pytest.fixture
def interp():
    """The kernels, run by Triton's interpreter on CPU tensors (CPU-only machines)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the kernels run compiled (see the gpu tests)")
    if not _interpreter_ready():
        if os.environ.get(_SUBPROCESS):
            pytest.fail("the interpreter is not active even in the fresh subprocess")
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: "
                    "test_interpreter_tests_in_subprocess runs these tests")
    assert tk.interpreted()
    return tk


def test_interpreter_tests_in_subprocess():
    """When another module imported triton first, run this module's interpreter tests in a fresh process."""
    if torch.cuda.is_available() or _interpreter_ready() or os.environ.get(_SUBPROCESS):
        pytest.skip("the interpreter tests run in this process (or there is a GPU)")
    env = dict(os.environ, TRITON_INTERPRET="1", **{_SUBPROCESS: "1"})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def assert_close(y, want, rtol):
    assert y.dtype == want.dtype and y.shape == want.shape
    torch.testing.assert_close(y.float(), want.float(), rtol=rtol, atol=rtol)


def assert_close_normwise(y, want, rtol):
    """Matmuls: the largest error relative to the largest output (elementwise rtol is meaningless
    for outputs near zero after cancellation)."""
    assert y.dtype == want.dtype and y.shape == want.shape
    err = (y.float() - want.float()).abs().max().item()
    assert err <= rtol * want.float().abs().max().item(), f"max error {err} vs max |y| {want.abs().max()}"


def int4_weight(n, k, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.02 + 0.005
    zero = torch.randn(n, k // g, generator=gen) * 0.01
    return codes, scale, zero


def fp8_operands(m, n, k, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 4).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, generator=gen) * 4).to(torch.float8_e4m3fn)
    xs = torch.rand(m, 1, generator=gen) * 0.1 + 0.01
    ws = torch.rand(1, n, generator=gen) * 0.1 + 0.01
    return [t.to(device) for t in (x, w, xs, ws)]


# ---- no GPU needed -------------------------------------------------------------------------------

def test_available_says_why_on_cpu():
    if torch.cuda.is_available():
        assert tk.available().ok
    else:
        assert not tk.available().ok
        assert tk.available().reason == tk.NO_GPU_REASON


def test_int4_prepack_layout_holds_every_code():
    codes, scale, zero = int4_weight(5, 128, 64)
    p = tk.int4_prepack(codes, scale, zero, 64)
    q = p["qweight"].reshape(5, 2, 32)  # [N, groups, g/2]: low nibble channel j, high j + g/2
    unpacked = torch.cat([q & 0xF, q >> 4], dim=2).reshape(5, 128)
    assert torch.equal(unpacked, codes)
    assert torch.equal(p["scale"], scale.t()) and torch.equal(p["zero"], zero.t())


def test_int4_supports_powers_of_two_from_32():
    assert [g for g in (16, 32, 48, 64, 96, 128, 256, 512) if tk.int4_supports(g)] == [32, 64, 128, 256, 512]


@pytest.mark.parametrize("g,k", [(48, 96), (16, 64), (64, 100)])
def test_int4_rejects_bad_group_size(g, k):
    codes, scale, zero = int4_weight(4, 96, 48)
    with pytest.raises(ValueError, match="group_size"):
        tk.int4_prepack(codes[:, :k] if k <= 96 else codes, scale, zero, g)


# ---- interpreter (CPU) --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(1, 576), (3, 577), (2, 2, 33)])
def test_rms_norm_matches_reference(interp, dtype, shape):
    x = torch.randn(shape).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    assert_close(interp.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_rms_norm_with_residual_matches_reference(interp, dtype):
    x, r = torch.randn(3, 577).to(dtype), torch.randn(3, 577).to(dtype)
    w = torch.rand(577, dtype=torch.float32) + 0.5  # fp32 weight with low-precision activations
    y, h = interp.rms_norm(x, w, 1e-5, residual=r)
    assert_close(h, x + r, tol(dtype))
    # y from the kernel's own h: the interpreter truncates h to bf16 where torch rounds, and that
    # step, compounded by the output's own rounding, could exceed 1e-2 (the GPU tests compare y directly)
    assert_close(y, ref.rms_norm(h, w, 1e-5), tol(dtype))


def test_rms_norm_llama_width(interp):
    x, w = torch.randn(1, 4096), torch.rand(4096) + 0.5
    assert_close(interp.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(1, 1536), (3, 1537), (2, 5, 7)])
def test_swiglu_matches_reference(interp, dtype, shape):
    gate, up = (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype)
    assert_close(interp.swiglu(gate, up), ref.swiglu(gate, up), tol(dtype))


def test_swiglu_reads_strided_halves_in_place(interp):
    h = torch.randn(2, 3, 2 * 45)
    gate, up = h[..., :45], h[..., 45:]
    y = interp.swiglu(gate, up)
    assert y.is_contiguous()
    assert_close(y, ref.swiglu(gate, up), 1e-5)
    assert_close(interp.swiglu(gate.transpose(0, 1), up.transpose(0, 1)),  # not viewable: copied first
                 ref.swiglu(gate.transpose(0, 1), up.transpose(0, 1)), 1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(100) = inf is intended
def test_swiglu_extreme_gate_stays_finite(interp):
    gate = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0]])
    up = torch.ones_like(gate)
    assert_close(interp.swiglu(gate, up), ref.swiglu(gate, up), 1e-5)


@pytest.mark.parametrize("m", [1, 3, 17, 40])  # GEMV below 16 rows, tiled GEMM from 16
@pytest.mark.parametrize("n,k,g", [(40, 576, 64), (24, 256, 128), (33, 96, 32)])
def test_int4_matmul_matches_dequantized_reference(interp, m, n, k, g):
    codes, scale, zero = int4_weight(n, k, g)
    x = torch.randn(m, k)
    assert_close_normwise(interp.int4_matmul(x, codes, scale, zero, g), ref.int4_matmul(x, codes, scale, zero, g), 1e-3)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("m", [1, 20])
def test_int4_matmul_low_precision(interp, dtype, m):
    codes, scale, zero = int4_weight(24, 128, 64)
    x = torch.randn(m, 128).to(dtype)
    assert_close_normwise(interp.int4_matmul(x, codes, scale, zero, 64), ref.int4_matmul(x, codes, scale, zero, 64), 1e-2)


def test_int4_packed_keeps_leading_dims(interp):
    codes, scale, zero = int4_weight(16, 64, 32)
    packed = interp.int4_prepack(codes, scale, zero, 32)
    x = torch.randn(2, 9, 64)
    y = interp.int4_matmul_packed(x, packed, 32, 16, 64)
    assert y.shape == (2, 9, 16)
    assert_close_normwise(y, ref.int4_matmul(x, codes, scale, zero, 32), 1e-3)


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (19, 70, 200), (33, 17, 64)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_matmul_matches_reference(interp, m, n, k, out_dtype):
    x, w, xs, ws = fp8_operands(m, n, k)
    rtol = 1e-3 if out_dtype == torch.float32 else 1e-2
    assert_close_normwise(interp.fp8_scaled_matmul(x, w, xs, ws, out_dtype),
                          ref.fp8_scaled_matmul(x, w, xs, ws, out_dtype), rtol)


def test_fp8_rejects_float_inputs(interp):
    x, w, xs, ws = fp8_operands(2, 4, 32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        interp.fp8_scaled_matmul(x.float(), w, xs, ws, torch.float32)


# ---- GPU, real shapes ---------------------------------------------------------------------------

SHAPES = {"smollm2": (576, 1536), "llama8b": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("rows", [1, 128, 131])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_gpu_rms_norm_and_swiglu(model, rows, dtype):
    hidden, mlp = SHAPES[model]
    x, r = torch.randn(rows, hidden, device="cuda", dtype=dtype), torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = torch.rand(hidden, device="cuda", dtype=dtype) + 0.5
    assert_close(tk.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), tol(dtype))
    (y, h), (y_ref, h_ref) = tk.rms_norm(x, w, 1e-5, r), ref.rms_norm(x, w, 1e-5, r)
    assert_close(h, h_ref, tol(dtype))
    assert_close(y, y_ref, tol(dtype))
    gate, up = torch.randn(rows, mlp, device="cuda", dtype=dtype) * 3, torch.randn(rows, mlp, device="cuda", dtype=dtype)
    assert_close(tk.swiglu(gate, up), ref.swiglu(gate, up), tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(1536, 576), (576, 1536), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 7, 128, 131])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_int4_matmul(n, k, m, dtype):
    g = 64 if k == 576 else 128
    codes, scale, zero = (t.cuda() for t in int4_weight(n, k, g))
    x = torch.randn(m, k, device="cuda").to(dtype)
    packed = tk.int4_prepack(codes, scale, zero, g)
    assert_close_normwise(tk.int4_matmul_packed(x, packed, g, n, k), ref.int4_matmul(x, codes, scale, zero, g),
                          1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(1536, 576), (14336, 4096), (4097, 1000)])
@pytest.mark.parametrize("m", [1, 16, 128, 200])
def test_gpu_fp8_scaled_matmul(n, k, m):
    x, w, xs, ws = fp8_operands(m, n, k, device="cuda")
    assert_close_normwise(tk.fp8_scaled_matmul(x, w, xs, ws, torch.float32),
                          ref.fp8_scaled_matmul(x, w, xs, ws, torch.float32), 1e-3)


# ---- every tile configuration the GPU autotuner may pick (interpreter) --------------------------

@pytest.mark.parametrize("kind,index", [("gemv", i) for i in range(6)] + [("gemm", i) for i in range(6)])
def test_int4_every_tuning_config(interp, monkeypatch, kind, index):
    """The masks hold for every tile shape: M and N straddle block edges, two group sizes."""
    from optistack.kernels.triton import int4

    configs = int4._GEMV_CONFIGS if kind == "gemv" else int4._GEMM_CONFIGS
    monkeypatch.setattr(int4, "_GEMV_CONFIGS" if kind == "gemv" else "_GEMM_CONFIGS", [configs[index]])
    m = 3 if kind == "gemv" else 17
    for n, k, g in ((37, 128, 32), (20, 256, 256)):
        codes, scale, zero = int4_weight(n, k, g)
        x = torch.randn(m, k)
        assert_close_normwise(interp.int4_matmul(x, codes, scale, zero, g), ref.int4_matmul(x, codes, scale, zero, g), 1e-3)


@pytest.mark.parametrize("index", range(7))
def test_fp8_every_tuning_config(interp, monkeypatch, index):
    from optistack.kernels.triton import fp8

    monkeypatch.setattr(fp8, "_CONFIGS", [fp8._CONFIGS[index]])
    x, w, xs, ws = fp8_operands(17, 37, 200)
    assert_close_normwise(interp.fp8_scaled_matmul(x, w, xs, ws, torch.float32),
                          ref.fp8_scaled_matmul(x, w, xs, ws, torch.float32), 1e-3)


def test_fp8_every_e4m3_value_survives_exactly(interp):
    """x @ I: each finite e4m3 value (subnormals, negatives, +-448) comes back bit-exact in float32."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    values = values[~values.float().isnan()].reshape(2, -1)  # 254 finite values
    k = values.shape[1]
    eye = torch.eye(k).to(torch.float8_e4m3fn)
    y = interp.fp8_scaled_matmul(values, eye, torch.ones(2, 1), torch.ones(1, k), torch.float32)
    assert torch.equal(y, values.float())


@pytest.mark.gpu
def test_gpu_kernels_refuse_cpu_tensors_with_a_reason():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="need a CUDA GPU"):
        tk.rms_norm(x, torch.ones(64), 1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_kernels_run_inside_torch_compile():
    codes, scale, zero = (t.cuda() for t in int4_weight(256, 128, 64))
    packed = tk.int4_prepack(codes, scale, zero, 64)
    w = torch.rand(128, device="cuda") + 0.5

    def block(x, r):
        y, h = tk.rms_norm(x, w, 1e-5, r)
        up = tk.int4_matmul_packed(y, packed, 64, 256, 128)
        return tk.swiglu(up[..., :128], up[..., 128:]) + h

    def block_ref(x, r):
        y, h = ref.rms_norm(x, w, 1e-5, r)
        up = ref.int4_matmul(y, codes, scale, zero, 64)
        return ref.swiglu(up[..., :128], up[..., 128:]) + h

    x, r = torch.randn(2, 5, 128, device="cuda"), torch.randn(2, 5, 128, device="cuda")
    torch.testing.assert_close(torch.compile(block)(x, r), block_ref(x, r), rtol=1e-3, atol=1e-3)


# ---- ahead-of-time compilation for real GPUs, no GPU needed ---------------------------------------

def _aot_variants():
    """(kernel, signature, constexprs, num_warps, target (arch)) for every kernel, dtype family and
    tuning config the wrappers can launch."""
    from optistack.kernels.triton import activation, fp8, int4, norm

    for dt, wdt, res, block in (("bf16", "bf16", True, 4096), ("fp16", "fp32", True, 1024), ("fp32", "fp32", False, 1024)):
        sig = dict(x_ptr=f"*{dt}", r_ptr=f"*{dt}", w_ptr=f"*{wdt}", y_ptr=f"*{dt}", h_ptr=f"*{dt}", n_cols="i32",
                   eps="fp32", HAS_RESIDUAL="constexpr", BLOCK="constexpr")
        yield norm._rms_norm_kernel, sig, dict(HAS_RESIDUAL=res, BLOCK=block), norm._num_warps(block), 90
    for dt in ("bf16", "fp32"):
        sig = dict(g_ptr=f"*{dt}", u_ptr=f"*{dt}", y_ptr=f"*{dt}", n_cols="i32", g_stride="i32", u_stride="i32",
                   BLOCK="constexpr")
        yield activation._swiglu_kernel, sig, dict(BLOCK=activation._BLOCK), 4, 90
    base = dict(q_ptr="*u8", s_ptr="*fp32", z_ptr="*fp32", N="i32", K="i32", n_groups="i32", GROUP="constexpr")
    for i, cfg in enumerate(int4._GEMV_CONFIGS):
        dt, group = ("bf16", 128) if i % 2 == 0 else ("fp32", 32)
        sig = dict(x_ptr=f"*{dt}", y_ptr=f"*{dt}", BLOCK_N="constexpr", **base)
        yield int4._int4_gemv_kernel, sig, dict(GROUP=group, BLOCK_N=cfg["BLOCK_N"]), cfg["num_warps"], 90
    for i, cfg in enumerate(int4._GEMM_CONFIGS):
        dt, group = (("bf16", 128), ("fp16", 256), ("fp32", 64))[i % 3]
        sig = dict(x_ptr=f"*{dt}", y_ptr=f"*{dt}", M="i32", M_BUCKET="i32", BLOCK_M="constexpr", BLOCK_N="constexpr",
                   IEEE="constexpr", UPCAST="constexpr", **base)
        consts = dict(GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], IEEE=dt == "fp32", UPCAST=False)
        yield int4._int4_gemm_kernel, sig, consts, cfg["num_warps"], 90
    for i, cfg in enumerate(fp8._CONFIGS):
        for native, arch, operand in ((True, 90, "fp8e4nv"), (False, 80, "u8")):
            if not native and i % 3:
                continue
            sig = dict(x_ptr=f"*{operand}", w_ptr=f"*{operand}", xs_ptr="*fp32", ws_ptr="*fp32", y_ptr="*bf16",
                       M="i32", N="i32", K="i32", M_BUCKET="i32", BLOCK_M="constexpr", BLOCK_N="constexpr",
                       BLOCK_K="constexpr", NATIVE_FP8="constexpr")
            consts = {k: v for k, v in cfg.items() if k.isupper()} | dict(NATIVE_FP8=native)
            yield fp8._fp8_mm_kernel, sig, consts, cfg["num_warps"], arch


def _aot_compile_all() -> int:
    """Compile every variant to a cubin with Triton's bundled ptxas; returns how many."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    count = 0
    for kernel, sig, consts, warps, arch in _aot_variants():
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        assert compiled.asm["cubin"], (kernel.__name__, consts)
        count += 1
    return count


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_ampere_without_a_gpu():
    """Triton compiles each kernel and tuning config down to sm_90 / sm_80 machine code here: catches
    what the interpreter lets through (dot shapes, fp8 on Hopper, types) before a GPU ever runs it."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu tests compile and run the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--aot"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "compiled" in proc.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--aot"]:
    print(f"compiled {_aot_compile_all()} kernel variants")
