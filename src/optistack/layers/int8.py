"""`Int8Linear`: symmetric int8 weights with one float32 scale per output row (the int8 head of `awq` /
`rtn-int4`, see passes/quant/head.py), W = qweight * scale[:, None].

Two kernels, decided when the layer is built (forward must not probe anything: a graph break):

- `cpu-cpp`: optistack's C++ int8 GEMV, `torch.ops.optistack_cpu.int8_matmul`, for float32/bfloat16
  activations on the CPU. The kernels layer builds and loads it (`optistack.kernels.cpu.ensure_built`);
  this layer only calls the op through torch's op registry, so it imports nothing above it. A layer
  built before the op is loaded takes `torch`; `use_kernel("cpu-cpp")` switches it later.
- `torch`: dequantize and multiply (`int8_matmul_reference`): right everywhere, fast nowhere. CUDA
  inputs always take it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.load_registry import LINEAR_FIELDS, register_module

KERNELS = ("cpu-cpp", "torch")
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def int8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ w.T with w = qweight * scale[:, None] (int8 [N, K], one scale per output row), in float32,
    cast to x.dtype. (The cpu-cpp kernel also rounds x to 15 bits per row; see csrc/cpu/int8_gemm.cpp.)"""
    w = qweight.float() * scale.float().unsqueeze(1)
    return F.linear(x.float(), w.to(x.device)).to(x.dtype)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per row) of a [N, K] matrix: symmetric, scale = the row's largest magnitude
    / 127, code = round(w / scale). A few MB of rows at a time: the float temporaries of a whole 32,000 x
    2,048 head at once were 0.6 GB beside a 262 MB matrix (the peak of quantizing a ~1.1B Llama)."""
    w = w.detach()
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    step = max(1, (1 << 20) // max(1, k))
    for r in range(0, n, step):
        part = w[r:r + step].float()
        s = part.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        codes[r:r + step] = torch.round(part / s.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        scale[r:r + step] = s
    return codes, scale


def cpp_kernel_loaded() -> bool:
    """Whether optistack's C++ int8 op is registered with torch in this process (never builds it)."""
    try:
        return torch.ops.optistack_cpu.int8_matmul is not None
    except (AttributeError, RuntimeError):
        return False


class Int8Linear(nn.Module):
    """y = x W^T + b, W = qweight * scale[:, None] (int8 [N, K], float32 scale per output row)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kernel: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = "torch"
        self.use_kernel(kernel if kernel is not None else ("cpu-cpp" if cpp_kernel_loaded() else "torch"))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def use_kernel(self, kernel: str) -> None:
        """Run on `kernel` ("cpu-cpp" needs the C++ op loaded: see the module docstring)."""
        if kernel not in KERNELS:
            raise ValueError(f"Int8Linear: kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        if kernel == "cpu-cpp" and not cpp_kernel_loaded():
            raise ValueError("Int8Linear: kernel 'cpu-cpp' needs optistack's C++ kernels loaded "
                             "(optistack.kernels.cpu.ensure_built())")
        self.kernel = kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str | None = None) -> "Int8Linear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, kernel=kernel)
        new.qweight, new.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            new.bias = linear.bias.detach().float().clone()
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale.unsqueeze(1)).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dequantized [out, in] weight (the bias dtype, else float32), for model code that reads
        `layer.weight`; each read dequantizes (see passes/linears.py)."""
        return self.dequantized_weight(self.bias.dtype if self.bias is not None else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kernel == "cpu-cpp" and x.device.type == "cpu" and x.dtype in _CPP_DTYPES
                and self.scale.dtype == torch.float32):
            y = torch.ops.optistack_cpu.int8_matmul(x, self.qweight, self.scale)
        else:
            y = int8_matmul_reference(x, self.qweight, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def optistack_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "Int8Linear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


register_module(Int8Linear, LINEAR_FIELDS)
