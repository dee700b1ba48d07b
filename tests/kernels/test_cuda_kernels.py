"""CUDA C++ kernels: the sources compile with nvcc (compile only, where nvcc exists), the Python side
(int4 layout, fake impls, availability) works on any machine, and on a GPU every op matches the
plain-torch reference at SmolLM2 and Llama-8B shapes and composes with torch.compile."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from optistack.kernels import cuda
from optistack.kernels import reference as ref


def int4_weight(n, k, g, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.02 + 0.005
    zero = torch.randn(n, k // g, generator=gen) * 0.01
    return codes.to(device), scale.to(device), zero.to(device)


def assert_close_normwise(y, want, rtol):
    assert y.dtype == want.dtype and y.shape == want.shape
    err = (y.float() - want.float()).abs().max().item()
    assert err <= rtol * want.float().abs().max().item(), f"max error {err} vs max |y| {want.abs().max()}"


# ---- any machine --------------------------------------------------------------------------------

def test_available_says_why():
    """Here: ok with no reason where every piece is present, else not ok naming the first piece missing."""
    check = cuda.available()
    pieces = [("failed to build", "error" not in getattr(cuda, "_state", {})),
              ("built without CUDA", torch.version.cuda is not None), ("no CUDA GPU", torch.cuda.is_available()),
              ("nvcc not found", cuda.find_nvcc() is not None), ("ninja not found", shutil.which("ninja") is not None)]
    first_missing = next((words for words, present in pieces if not present), None)
    if first_missing is None:
        assert check.ok and check.reason is None
    else:
        assert not check.ok and first_missing in check.reason, check.reason


@pytest.mark.parametrize("absent, words", [(None, None), ("cuda-build", "built without CUDA"), ("gpu", "no CUDA GPU"),
                                           ("nvcc", "nvcc not found"), ("ninja", "ninja not found")])
def test_available_names_each_missing_piece(monkeypatch, absent, words):
    """Every branch on every machine: all pieces faked present, then one taken away."""
    monkeypatch.setattr(cuda, "_state", {})
    monkeypatch.setattr(torch.version, "cuda", None if absent == "cuda-build" else "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: absent != "gpu")
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None if absent == "nvcc" else "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(cuda.shutil, "which", lambda name: None if absent == name else f"/usr/bin/{name}")
    check = cuda.available()
    if words is None:
        assert check.ok and check.reason is None
    else:
        assert not check.ok and words in check.reason, check.reason


def test_int4_prepack_words_hold_codes_in_order():
    codes, scale, zero = int4_weight(6, 96, 32)
    packed = cuda.int4_prepack(codes, scale, zero, 32)
    words = packed["qweight"]
    assert words.dtype == torch.int32 and words.shape == (6, 12)
    unpacked = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], dim=-1).reshape(6, 96)
    assert torch.equal(unpacked.to(torch.uint8), codes)
    assert packed["scale"].dtype == torch.float32 and torch.equal(packed["zero"], zero)


@pytest.mark.parametrize("g", [16, 48])
def test_int4_prepack_rejects_group_sizes_the_kernel_cannot_read(g):
    codes, scale, zero = int4_weight(4, 96, 48 if g == 48 else 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda.int4_prepack(codes, scale, zero, g)


def test_int4_supports_matches_what_prepack_accepts():
    for g in (16, 32, 48, 64, 96, 128, 256):
        codes, scale, zero = int4_weight(2, 3 * 256 if g != 48 else 96 * 2, g)
        if cuda.int4_supports(g):
            cuda.int4_prepack(codes, scale, zero, g)
        else:
            with pytest.raises(ValueError):
                cuda.int4_prepack(codes, scale, zero, g)


def test_ensure_built_says_why_not_here():
    if not cuda.available().ok:
        with pytest.raises(RuntimeError, match="unavailable"):
            cuda.ensure_built()


def _schemas() -> dict[str, str]:
    """{op name: schema} from the m.def(...) lines of ops.cu."""
    text = (cuda.SOURCE_DIR / cuda.ENTRY).read_text()
    return {name: schema for schema, name in re.findall(r'm\.def\("((\w+)\(.*?\) -> [^"]*)"\)', text)}


def test_every_op_has_a_fake_with_its_arguments():
    import inspect

    schemas = _schemas()
    assert set(schemas) == {"rms_norm", "rms_norm_residual", "swiglu", "int4_matmul"}
    for name, schema in schemas.items():
        fake = getattr(cuda, f"fake_{name}")
        args = [a.strip().split(" ")[-1] for a in schema[schema.index("(") + 1: schema.index(")")].split(",")]
        assert list(inspect.signature(fake).parameters) == args, name


def test_fakes_give_the_reference_shapes_and_dtypes():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    w = torch.rand(64)
    meta = x.to("meta")
    assert cuda.fake_rms_norm(meta, w.to("meta"), 1e-6).shape == ref.rms_norm(x, w, 1e-6).shape
    y, h = cuda.fake_rms_norm_residual(meta, meta, w.to("meta"), 1e-6)
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == x.dtype
    assert cuda.fake_swiglu(meta, meta).dtype == ref.swiglu(x, x).dtype
    codes, scale, zero = int4_weight(40, 64, 32)
    packed = {k: v.to("meta") for k, v in cuda.int4_prepack(codes, scale, zero, 32).items()}
    out = cuda.fake_int4_matmul(meta, packed["qweight"], packed["scale"], packed["zero"], 32)
    want = ref.int4_matmul(x, codes, scale, zero, 32)
    assert out.shape == want.shape and out.dtype == want.dtype


def test_schemas_parse_and_fakes_dispatch_under_fake_tensors():
    """The C++ schemas, defined in a scratch namespace here, accept our fakes through the dispatcher."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ns = "optistack_cuda_schema_check"
    lib = torch.library.Library(ns, "FRAGMENT")
    for name, schema in _schemas().items():
        lib.define(schema)
        torch.library.register_fake(f"{ns}::{name}", getattr(cuda, f"fake_{name}"), lib=lib)
    ops = getattr(torch.ops, ns)
    with FakeTensorMode():
        x, w = torch.empty(3, 7, 64, dtype=torch.float16), torch.empty(64)
        assert ops.rms_norm(x, w, 1e-6).shape == x.shape
        y, h = ops.rms_norm_residual(x, x, w, 1e-6)
        assert y.shape == h.shape == x.shape
        assert ops.swiglu(x, x).dtype == torch.float16
        q, sz = torch.empty(40, 8, dtype=torch.int32), torch.empty(40, 2)
        assert ops.int4_matmul(x, q, sz, sz, 32).shape == (3, 7, 40)


def test_build_directory_is_keyed_by_sources_and_versions():
    d = cuda.build_directory()
    from optistack.kernels import build

    assert d.parent == build.cache_root()
    assert d.name == f"cuda-{cuda.sources_hash()}" and cuda.sources_hash() == cuda.sources_hash()


@pytest.mark.slow
def test_sources_compile_with_nvcc(tmp_path):
    """Compile only (nothing runs CUDA here): catches syntax and torch API breaks in ~1 minute."""
    nvcc = cuda.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine; set CUDA_HOME to run this test)")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    flags = ["-c", "-std=c++20", "-O2", "-Xcompiler", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *COMMON_NVCC_FLAGS]
    includes = include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU-only torch wheels ship no generated CUDA macros
    cmd = [nvcc, *flags, *(f"-I{p}" for p in includes), str(cuda.SOURCE_DIR / cuda.ENTRY),
           "-o", str(tmp_path / "ops.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "ops.o").stat().st_size > 0
    ours = [line for line in proc.stderr.splitlines() if "csrc/cuda/" in line and "warning" in line]
    assert not ours, "\n".join(ours)


# ---- GPU ----------------------------------------------------------------------------------------

SHAPES = {"smollm2": (576, 1536), "llama8b": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("rows", [1, 128, 131])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_rms_norm_and_swiglu_match_reference(model, rows, dtype):
    hidden, mlp = SHAPES[model]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    x, r = (torch.randn(rows, hidden, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.rand(hidden, device="cuda", dtype=dtype) + 0.5
    torch.testing.assert_close(cuda.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=tol, atol=tol)
    (y, h), (y_ref, h_ref) = cuda.rms_norm(x, w, 1e-5, r), ref.rms_norm(x, w, 1e-5, r)
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(cuda.rms_norm(x, w.float(), 1e-5), ref.rms_norm(x, w.float(), 1e-5), rtol=tol, atol=tol)
    gate, up = torch.randn(rows, mlp, device="cuda", dtype=dtype) * 3, torch.randn(rows, mlp, device="cuda", dtype=dtype)
    torch.testing.assert_close(cuda.swiglu(gate, up), ref.swiglu(gate, up), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(1536, 576), (576, 1536), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_int4_matmul_matches_dequantized_reference(n, k, m, dtype):
    g = 64 if k == 576 else 128
    codes, scale, zero = int4_weight(n, k, g, device="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    packed = cuda.int4_prepack(codes, scale, zero, g)
    assert_close_normwise(cuda.int4_matmul_packed(x, packed, g, n, k), ref.int4_matmul(x, codes, scale, zero, g),
                          1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_ops_compose_with_torch_compile():
    codes, scale, zero = int4_weight(256, 128, 64, device="cuda")
    packed = cuda.int4_prepack(codes, scale, zero, 64)
    w = torch.rand(128, device="cuda") + 0.5

    def block(x, r):
        y, h = cuda.rms_norm(x, w, 1e-5, r)
        up = cuda.int4_matmul_packed(y, packed, 64, 256, 128)
        return cuda.swiglu(up[..., :128], up[..., 128:]) + h

    def block_ref(x, r):
        y, h = ref.rms_norm(x, w, 1e-5, r)
        up = ref.int4_matmul(y, codes, scale, zero, 64)
        return ref.swiglu(up[..., :128], up[..., 128:]) + h

    x, r = torch.randn(2, 5, 128, device="cuda"), torch.randn(2, 5, 128, device="cuda")
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, r), block_ref(x, r), rtol=1e-3, atol=1e-3)
