"""`Fp8Linear`: a Linear whose weight is stored in E4M3 (`torch.float8_e4m3fn`) with one float32 scale
per output channel, in core torch (the layer of the `fp8` pass, passes/quant/fp8.py).

`mode="weight-only"` dequantizes the weight to the input dtype in every forward, then `F.linear`;
`mode="dynamic"` (W8A8) also gives each token's activations a scale at run time (row amax / 448, the
largest finite e4m3 value) and casts them to e4m3: `kernel="scaled_mm"` runs `torch._scaled_mm` with
row-wise scales (CUDA, compute capability >= 8.9), `kernel="emulated"` quantizes and dequantizes both
operands in float (any machine; slower than fp32 on CPU, only weight memory shrinks).
`quantize_rows_mse` picks, per row, the scale among one octave above amax/448 with the least squared
error (the `fp8` pass's default `scale=mse`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core.load_registry import LINEAR_FIELDS, register_module
from ..core.load_schema import choice

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_SCALE = 1e-12  # all-zero rows/tokens: keep the scale finite, the values stay 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales of shape [rows, 1]), scale = row amax / 448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_rows_mse(x: torch.Tensor, candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `quantize_rows`, but each row takes the scale with the least squared error among
    amax/448 * 2**(i/candidates), i = 0..candidates-1. e4m3 steps are relative (3 mantissa bits), so
    one octave of scales covers every alignment of the value grid; none of them clips."""
    xf = x.float()
    base = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=_MIN_SCALE)
    best_scale, best_err = base, None
    for i in range(candidates):
        scale = base * 2.0 ** (i / candidates)
        err = ((xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale - xf).square().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    return (xf / best_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), best_scale


class Fp8Linear(torch.nn.Module):
    """A Linear whose weight is stored in e4m3 with per-output-channel scales.

    `kernel="emulated"`: dequantize (and, for `mode="dynamic"`, fake-quantize the activations per
    token), then `F.linear` in the input dtype. `kernel="scaled_mm"`: activations quantized per token,
    `torch._scaled_mm(x_fp8, W_fp8.t(), scale_a=[M, 1], scale_b=[1, N], out_dtype=bfloat16)`; the
    transposed row-major weight is the column-major second operand cuBLASLt requires. Only for
    `mode="dynamic"` (weight-only has no fp8 x float kernel in core torch).
    """

    def __init__(self, in_features: int, out_features: int, *, mode: str = "weight-only",
                 kernel: str = "emulated", bias: bool = True, device: Any = None) -> None:
        super().__init__()
        if mode not in ("weight-only", "dynamic"):
            raise ValueError(f"Fp8Linear: mode must be 'weight-only' or 'dynamic', got {mode!r}")
        if kernel not in ("emulated", "scaled_mm"):
            raise ValueError(f"Fp8Linear: kernel must be 'emulated' or 'scaled_mm', got {kernel!r}")
        if kernel == "scaled_mm" and mode != "dynamic":
            raise ValueError("Fp8Linear: kernel 'scaled_mm' quantizes activations; it needs mode='dynamic'")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.kernel = mode, kernel
        self.weight_dtype = torch.float32  # the dtype `.weight` reads back in (the replaced layer's)
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, mode: str = "weight-only", kernel: str = "emulated",
                    scale: str = "mse") -> "Fp8Linear":
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, mode=mode, kernel=kernel,
                  bias=linear.bias is not None, device=w.device)
        q, s = quantize_rows_mse(w) if scale == "mse" else quantize_rows(w)
        new.weight_fp8.copy_(q)
        new.weight_scale.copy_(s)
        if linear.bias is not None:
            new.bias = linear.bias.detach().clone()
        new.weight_dtype = w.dtype
        return new

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized [out, in] weight (dtype of the replaced layer, or of the bias,
        which follows casts), for model code that reads `layer.weight`; each read dequantizes."""
        dtype = self.bias.dtype if self.bias is not None and self.bias.is_floating_point() else self.weight_dtype
        return self.dequantized_weight(dtype)

    def optistack_spec(self) -> dict[str, Any]:
        """JSON constructor arguments, so `optistack.load` rebuilds this layer without pickle."""
        return {"in_features": self.in_features, "out_features": self.out_features, "mode": self.mode,
                "kernel": self.kernel, "bias": self.bias is not None}

    @classmethod
    def from_optistack_spec(cls, spec: dict[str, Any]) -> "Fp8Linear":
        kernel = spec["kernel"] if torch.cuda.is_available() else "emulated"  # scaled_mm needs the GPU
        return cls(spec["in_features"], spec["out_features"], mode=spec["mode"], kernel=kernel, bias=spec["bias"])

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_fp8.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "scaled_mm":
            return self._scaled_mm(x)
        w = self.dequantized_weight(x.dtype)
        if self.mode == "dynamic":
            q, scale = quantize_rows(x.reshape(-1, self.in_features))
            x = (q.to(torch.float32) * scale).to(x.dtype).reshape(x.shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale_a = quantize_rows(x.reshape(-1, self.in_features))  # [M, K] row-major, [M, 1]
        out = torch._scaled_mm(
            q, self.weight_fp8.t(),  # [K, N] column-major view of the [N, K] row-major weight
            scale_a=scale_a.contiguous(),
            scale_b=self.weight_scale.reshape(1, -1).contiguous(),  # [1, N] float32
            out_dtype=torch.bfloat16,  # row-wise scaling on CUDA only supports bf16 output
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    # Plain `pickle` of float8 tensors fails in torch 2.13 (torch.save and deepcopy work): pickle the
    # fp8 weight as a uint8 view of the same bytes, and view it back as e4m3 on load.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        buffers = dict(state["_buffers"])
        buffers["weight_fp8"] = buffers["weight_fp8"].view(torch.uint8)
        state["_buffers"] = buffers
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._buffers["weight_fp8"] = self._buffers["weight_fp8"].view(E4M3)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}, kernel={self.kernel}")


register_module(Fp8Linear, {**LINEAR_FIELDS, "mode": choice("weight-only", "dynamic"),
                            "kernel": choice("emulated", "scaled_mm")})
