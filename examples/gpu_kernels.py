"""The GPU kernels (Triton and CUDA C++) on one SmolLM2-sized decoder MLP step, checked against the
plain-torch references and timed against torch.

    python examples/gpu_kernels.py            # needs a CUDA GPU; the CUDA backend builds once (~1 min)

On a machine without a GPU it says so and exits (the CPU kernels are in the `cpu-cpp` backend, and
the `fuse-kernels` pass picks the right backend for a model by itself).
"""
import sys

import torch

from optistack.kernels import cuda, reference
from optistack.kernels import triton as triton_kernels

backends = {"triton": triton_kernels, "cuda": cuda}
usable = {name: mod for name, mod in backends.items() if mod.available().ok}
if not usable:
    for name, mod in backends.items():
        print(f"skipping the {name} kernels: {mod.available().reason}")
    print("This example needs a CUDA GPU; nothing to run here.")
    sys.exit(0)


def time_ms(fn, reps=200):
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


hidden, mlp, group = 576, 1536, 64
torch.manual_seed(0)
x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)  # one decode token
residual = torch.randn_like(x)
norm_weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
codes = torch.randint(0, 16, (2 * mlp, hidden), dtype=torch.uint8, device="cuda")  # gate and up, fused
scale = torch.rand(2 * mlp, hidden // group, device="cuda") * 0.02
zero = torch.randn(2 * mlp, hidden // group, device="cuda") * 0.01


def mlp_step(k, packed):
    """residual add + RMSNorm -> int4 gate/up projection -> SwiGLU."""
    y, _ = k.rms_norm(x, norm_weight, 1e-5, residual)
    gate_up = k.int4_matmul_packed(y, packed, group, 2 * mlp, hidden) if packed is not None else \
        k.int4_matmul(y, codes, scale, zero, group)
    return k.swiglu(gate_up[:, :mlp].contiguous(), gate_up[:, mlp:].contiguous())


want = mlp_step(reference, None)
print(f"torch reference: {time_ms(lambda: mlp_step(reference, None)):.4f} ms per step")
for name, mod in backends.items():
    if name not in usable:
        print(f"{name}: not available ({mod.available().reason})")
        continue
    packed = mod.int4_prepack(codes, scale, zero, group)
    got = mlp_step(mod, packed)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    print(f"{name}: {time_ms(lambda: mlp_step(mod, packed)):.4f} ms per step, max error {err:.1e} of max |y|")

if triton_kernels.available().ok:  # FP8 has a Triton kernel only
    xq = (torch.randn(16, hidden, device="cuda") * 4).to(torch.float8_e4m3fn)
    wq = (torch.randn(mlp, hidden, device="cuda") * 4).to(torch.float8_e4m3fn)
    xs, ws = torch.rand(16, 1, device="cuda") * 0.1, torch.rand(1, mlp, device="cuda") * 0.1
    got = triton_kernels.fp8_scaled_matmul(xq, wq, xs, ws, torch.bfloat16)
    want = reference.fp8_scaled_matmul(xq, wq, xs, ws, torch.bfloat16)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    print(f"triton fp8_scaled_matmul 16x{hidden}->{mlp}: max error {err:.1e} of max |y|")
