"""Backend "cpu-cpp": vectorized C++ kernels (AVX-512 / AVX2), ops in `torch.ops.optistack_cpu`.

Same functions as `reference.py`. Sources are in optistack/csrc/cpu/; `ensure_built()` loads the build an
installed wheel carries for this CPU (prebuilt.py), else compiles them once per source/flags/torch
version into the persistent cache (see build.py: the development path), and registers fake
implementations so the ops trace under torch.compile. Inputs the kernels do not take (other dtypes,
other devices) go to the reference implementation, so every function here always answers.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.requirements import Availability
from . import build, prebuilt, reference

BACKEND = "cpu-cpp"
SOURCES = ["ops.cpp", "bindings.cpp", "norm_act.cpp", "int4_gemm.cpp", "int4_dequant.cpp", "int8_gemm.cpp",
           "int4_q8_gemv.cpp", "int4_vnni_gemm.cpp", "int4_panel.cpp", "int4_amx.cpp", "int4_amx_int8.cpp", "llama_setup.cpp",
           "llama_decode.cpp", "q4_linear.cpp"]
HEADERS = ["simd.h", "kernels.h", "int4_gemm_prep.h", "int4_layout.h", "llama_decode.h", "llama_ops.h", "llama_attn_chunk.h",
           "llama_attn_rows.h", "llama_attn_amx.h", "amx_tiles.h", "int4_panel.h", "llama_team.h",
           "llama_profile.h"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
GROUP_SIZES = (32, 64, 128, 256)
CHUNK_K = 4096  # input channels per stored chunk of an int4 weight; must match kChunkK in int4_layout.h
INT4_LAYOUT = "rows4-blocks128-chunks4096"  # recorded when a fused model is saved


def int4_layout_readable(saved: str | None, packed_k: int) -> bool:
    """Whether a weight saved in layout `saved` reads right here. Saves from before the layout had a
    name (None) stored whole rows, which is the same bytes as one chunk: readable up to CHUNK_K wide."""
    return saved == INT4_LAYOUT or (saved is None and packed_k <= CHUNK_K)
# float32 activations run as two bf16 halves (exact to 16 bits), twice the dot products of bf16 ones.
# Above this many rows (prefill) FusedInt4Linear rounds them to bf16 instead, as Int4Linear does for
# torch's kernel; from 12 bf16 rows on, int4_matmul dequantizes the weight to bf16 and runs a bf16 GEMM
# (int4_dequant.cpp: 2-4x torch's int4 kernel at 128 rows). Decode keeps the exact float32 product.
PREFILL_BF16_ROWS = 4
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": True and "lib": the module, or "error": first line of the build error


def _paths(names: list[str]) -> list[Path]:
    return [build.CSRC / "cpu" / n for n in names]


# -fopenmp: at::parallel_for is an inline OpenMP region, compiled serial without it. The extension
# then links libgomp.so.1, which resolves to the copy torch already loaded (one thread pool).
BASE_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _flags() -> tuple[str, list[str]]:
    level, isa = build.x86_isa_flags()
    profile = ["-DOPTISTACK_ENGINE_PROFILE"] if os.environ.get("OPTISTACK_ENGINE_PROFILE") == "1" else []
    return level, [*BASE_CFLAGS, *isa, *_sanitizer(), *profile]


def _sanitizer() -> list[str]:
    """$OPTISTACK_SANITIZE=address builds the kernels with AddressSanitizer (`make asan`: the process must
    preload libasan); its own cache directory, since the flags are part of the build key."""
    kind = os.environ.get("OPTISTACK_SANITIZE", "")
    if kind not in ("", "address"):
        raise RuntimeError(f"OPTISTACK_SANITIZE must be 'address' or unset; got {kind!r}")
    return ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if kind else []


def available() -> Availability:
    """Cheap: never builds. Ok with a prebuilt library for this CPU and torch (an installed wheel); else
    not ok without a C++ compiler, off x86, or after a failed build."""
    if "error" in _state:
        return Availability.no(f"the C++ CPU kernels failed to build: {_state['error']}")
    if not build.is_x86():
        return Availability.no(f"the C++ CPU kernels target x86 (AVX2/AVX-512); this CPU is {build.platform.machine()}")
    choice = prebuilt.cpu_choice()
    if choice.path is not None:
        return Availability.yes()
    if build.find_cxx() is None:
        return Availability.no(choice.reason or "no C++ compiler found (install g++ or set $CXX) to build the C++ CPU kernels")
    if not all(p.exists() for p in _paths(SOURCES + HEADERS)):
        return Availability.no("the C++ CPU kernel sources are missing from this installation")
    return Availability.yes()


def ensure_built() -> None:
    """Build (or load from the cache) and register the ops; raises RuntimeError saying why not."""
    if _state.get("ok"):
        return
    with _lock:
        if _state.get("ok"):
            return
        avail = available()
        if not avail:
            raise RuntimeError(avail.reason)
        choice = prebuilt.cpu_choice()
        try:
            if choice.path is not None:
                lib = prebuilt.load_module(choice.path)
            else:
                lib = build.build_and_load(BACKEND, "optistack_cpu", _paths(SOURCES), _flags()[1], _paths(HEADERS),
                                           [*LDFLAGS, *_sanitizer()])
        except Exception as exc:  # compiler errors arrive as long multi-line text
            lines = [ln.strip() for ln in str(exc).splitlines() if "error" in ln.lower()] or str(exc).splitlines() or [""]
            _state["error"] = lines[0][:300]
            raise RuntimeError(f"the C++ CPU kernels failed to build: {_state['error']}") from exc
        _register_fakes()
        _state["lib"] = lib
        _state["ok"] = True


def lib():
    """The built extension module: direct (pybind) entry points for eager calls, ~3 us cheaper per call
    than torch.ops.optistack_cpu.*, which the fused modules use only under torch.compile."""
    ensure_built()
    return _state["lib"]


def isa() -> str:
    """The instruction set the loaded build uses ("avx512-bf16", "avx512", "avx2" or "portable")."""
    ensure_built()
    return torch.ops.optistack_cpu.isa()


def _register_fakes() -> None:
    def same(x, *args):
        return torch.empty_like(x)

    torch.library.register_fake("optistack_cpu::rms_norm")(same)
    torch.library.register_fake("optistack_cpu::swiglu")(same)
    torch.library.register_fake("optistack_cpu::add_rms_norm")(lambda x, r, w, eps: (torch.empty_like(x), torch.empty_like(x)))
    torch.library.register_fake("optistack_cpu::int4_matmul")(
        lambda x, q, s, z, g: x.new_empty((*x.shape[:-1], q.shape[0])))
    torch.library.register_fake("optistack_cpu::int4_dequant")(
        lambda q, s, z, g: q.new_empty((q.shape[0], q.shape[1] * 2), dtype=torch.bfloat16))
    torch.library.register_fake("optistack_cpu::int8_matmul")(lambda x, q, s: x.new_empty((*x.shape[:-1], q.shape[0])))


def ops():
    """Kernel entry points: the direct bindings in eager mode, torch.ops.optistack_cpu while tracing."""
    ensure_built()
    return torch.ops.optistack_cpu if torch.compiler.is_compiling() else _state["lib"]


def _takes(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if not _takes(x, weight) or x.shape[-1] == 0:
        return reference.rms_norm(x, weight, eps, residual)
    if residual is None:
        return ops().rms_norm(x, weight, float(eps))
    return ops().add_rms_norm(x, residual.to(x.dtype), weight, float(eps))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if not _takes(gate, up) or gate.dtype != up.dtype or gate.shape != up.shape:
        return reference.swiglu(gate, up)
    return ops().swiglu(gate, up)


def int4_supports(group_size: int) -> bool:
    return group_size in GROUP_SIZES


def _block_order(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed byte of a row: the k of its low and of its high nibble (see int4_gemm.cpp)."""
    lo = []
    for k0 in range(0, k, 128):
        nbytes = 64 if k - k0 >= 128 else 32
        b = torch.arange(nbytes)
        lo.append(k0 + (b % 16 // 8) * (nbytes // 2) + b // 16 * 8 + b % 8)
    lo_t = torch.cat(lo)
    hi_t = torch.cat([t + (64 if len(t) == 64 else 32) for t in lo])
    return lo_t, hi_t


def _pack_chunks(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, Kp] -> packed bytes [N, Kp/2]: K in chunks of CHUNK_K channels stored one after the
    other, each chunk an [N, width/2] matrix of its own (see int4_layout.h)."""
    n, kp = codes.shape
    chunks = []
    for c0 in range(0, kp, CHUNK_K):
        part = codes[:, c0:c0 + CHUNK_K]
        lo, hi = _block_order(part.shape[1])
        chunks.append(_interleave_rows((part[:, lo] | (part[:, hi] << 4)).contiguous()).reshape(-1))
    return torch.cat(chunks).reshape(n, kp // 2)


def _interleave_rows(rows: torch.Tensor) -> torch.Tensor:
    """[N, Kp/2] per-row blocks -> the same shape with rows interleaved in groups of 4, block by block
    (64-byte blocks, then the 32-byte tail block), so 4 rows stream as one sequence; the last N % 4
    rows stay plain (see int4_gemm.cpp)."""
    n, half = rows.shape
    n4, main = n // 4 * 4, half // 64 * 64
    if n4 == 0:
        return rows
    grp = rows[:n4].reshape(n4 // 4, 4, half)
    body = grp[..., :main].reshape(n4 // 4, 4, main // 64, 64).transpose(1, 2).reshape(n4 // 4, -1)
    tail = grp[..., main:].reshape(n4 // 4, -1)
    return torch.cat([torch.cat([body, tail], dim=1).reshape(n4, half), rows[n4:]]).contiguous()


def _deinterleave_rows(rows: torch.Tensor) -> torch.Tensor:
    """The inverse of `_interleave_rows`."""
    n, half = rows.shape
    n4, main = n // 4 * 4, half // 64 * 64
    if n4 == 0:
        return rows
    grp = rows[:n4].reshape(n4 // 4, 4 * half)
    body = grp[:, : 4 * main].reshape(n4 // 4, main // 64, 4, 64).transpose(1, 2).reshape(n4 // 4, 4, main)
    tail = grp[:, 4 * main:].reshape(n4 // 4, 4, half - main)
    return torch.cat([torch.cat([body, tail], dim=2).reshape(n4, half), rows[n4:]])


def int4_unpack(qweight: torch.Tensor, n: int, kp: int) -> torch.Tensor:
    """codes uint8 [n, kp] back from `int4_prepack`'s qweight (the inverse of its packing)."""
    flat, out, off = qweight.reshape(-1).cpu(), torch.empty(n, kp, dtype=torch.uint8), 0
    for c0 in range(0, kp, CHUNK_K):
        width = min(CHUNK_K, kp - c0)
        rows = _deinterleave_rows(flat[off: off + n * width // 2].reshape(n, width // 2))
        lo, hi = _block_order(width)
        out[:, c0 + lo] = rows & 0x0F
        out[:, c0 + hi] = rows >> 4
        off += n * width // 2
    return out


def int4_prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """codes uint8 [N, K] (0..15), scale/zero [N, K/g] -> {"qweight" [N, Kp/2], "scale", "zero" [N, Kp/g]}.
    Kp is K rounded up to 64 (extra groups get scale 0 and zero 0). Scales stay bfloat16 when they are
    exactly bfloat16 values (half the bytes to stream), else float32."""
    n, k = codes.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"cpu-cpp int4: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"cpu-cpp int4: K={k} is not a multiple of group_size={group_size}")
    kp = -(-k // 64) * 64
    codes = codes.to(torch.uint8).cpu()
    scale, zero = scale.float().cpu(), zero.float().cpu()
    if kp != k:
        extra = (kp - k) // group_size
        codes = F.pad(codes, (0, kp - k), value=8)
        scale, zero = F.pad(scale, (0, extra)), F.pad(zero, (0, extra))
    packed = _pack_chunks(codes)
    as_bf16 = torch.equal(scale.bfloat16().float(), scale) and torch.equal(zero.bfloat16().float(), zero)
    sdt = torch.bfloat16 if as_bf16 else torch.float32
    return {"qweight": packed, "scale": scale.to(sdt).contiguous(), "zero": zero.to(sdt).contiguous()}


def int4_matmul_packed(x: torch.Tensor, packed: dict, group_size: int, n: int, k: int) -> torch.Tensor:
    kp = packed["qweight"].shape[1] * 2
    if x.device.type != "cpu":
        raise ValueError(f"cpu-cpp int4: x is on {x.device}; this backend runs on the CPU")
    if x.dtype not in KERNEL_DTYPES:  # e.g. float16: compute in float32
        return int4_matmul_packed(x.float(), packed, group_size, n, k).to(x.dtype)
    if kp != k:
        x = F.pad(x, (0, kp - k))
    return ops().int4_matmul(x, packed["qweight"], packed["scale"], packed["zero"], group_size)


def int4_dequant_packed(packed: dict, group_size: int, n: int, k: int) -> torch.Tensor:
    """The packed weight back as bfloat16 [n, k] (what prefill multiplies by; see int4_dequant.cpp)."""
    w = ops().int4_dequant(packed["qweight"], packed["scale"], packed["zero"], group_size)
    return w[:, :k] if w.shape[1] != k else w


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """One-shot form (packs every call: for tests; modules keep the packed dict)."""
    n, k = codes.shape
    return int4_matmul_packed(x, int4_prepack(codes, scale, zero, group_size), group_size, n, k)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (qweight * scale[:, None]).T for int8 [N, K] weights with a float32 scale per output row.
    The activations are quantized per row to int16 inside the kernel (see int8_gemm.cpp)."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or scale.dtype != torch.float32:
        return reference.int8_matmul(x, qweight, scale)
    return ops().int8_matmul(x, qweight, scale)
