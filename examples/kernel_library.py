"""Which C++ kernel library this install runs: the wheel's prebuilt build for this CPU, or one compiled on
first use (a source checkout / editable install), and why.

    python examples/kernel_library.py            # after `pip install dist/optistack-*.whl` or `pip install -e .`
    OPTISTACK_CPU_ISA=avx2 python examples/kernel_library.py   # the AVX2 build on an AVX-512 machine
"""
from __future__ import annotations

import torch

from optistack.kernels import build, cpu, prebuilt

manifest = prebuilt.manifest()
if manifest is None:
    print("source checkout / editable install: the kernels compile on first use into", build.cache_root())
else:
    print(f"wheel built against torch {manifest['torch']} with CPU variants {', '.join(manifest['cpu'])}"
          f"{' and CUDA' if manifest.get('cuda') else ''}; this torch is {torch.__version__}")
choice = prebuilt.cpu_choice()
print("prebuilt library:", choice.path or f"none ({choice.reason or 'not an installed wheel'})")
avail = cpu.available()
if avail:
    print(f"loaded: {cpu.lib().__file__} (instruction set {cpu.isa()})")
    x, w = torch.randn(2, 64), torch.ones(64)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    print("rms_norm matches the reference:", torch.allclose(cpu.rms_norm(x, w, 1e-6), want, atol=1e-5))
else:
    print("the C++ CPU kernels are unavailable:", avail.reason)
