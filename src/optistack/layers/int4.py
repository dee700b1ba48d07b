"""`Int4Linear`: an nn.Linear replacement that stores group-wise int4 weights (int4_grid.py) and runs
torch's int4 kernels.

Kernels (chosen per layer by `choose_kernel`):

- `cpu-int4pack`: `torch._convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)` -> uint8 [N, K/2],
  `torch._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros [K/g, N, 2])`.
  Needs N % 16 == 0 and group_size in {32, 64, 128, 256}. Activations must share the dtype of
  scales_and_zeros; only bf16 is fast (fp32/fp16 take a reference path ~50-100x slower), so x is cast
  to bf16 and the result back to x's dtype, and scales/zeros are stored in bf16.
- `cuda-int4pack`: `torch._convert_weight_to_int4pack(uint8 [N, K/2] (even k in the high nibble),
  inner_k_tiles)` and `torch._weight_int4pack_mm` (bf16, compute capability >= 8.0, N % 8 == 0,
  K % (inner_k_tiles * 16) == 0). Written to the same contract; not testable on CPU-only machines.
- `dequant`: the fallback where no kernel fits: nibble-packed uint8 codes plus fp32 scales/zeros,
  dequantized to x's dtype in every call, then a plain matmul. Memory is still int4; speed is not.

A padded in_features (see int4_grid.py) gives the input zero columns, so they contribute nothing.
Packed weights, scales/zeros and bias are buffers, so `model_bytes` (parameters + buffers) sees the
true storage. `int4_parts(layer)` gives the codes, scales and zeros back whatever the kernel, for the
kernels layer to repack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.load_registry import LINEAR_FIELDS, register_module
from ..core.load_schema import choice, integer
from .int4_grid import MID, GroupQuant, dequantize, padded_size, quantize

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
CPU_KERNEL, CUDA_KERNEL, DEQUANT = "cpu-int4pack", "cuda-int4pack", "dequant"


def choose_kernel(device: torch.device | str, out_features: int, in_features: int, group_size: int) -> tuple[str, str | None]:
    """(kernel, None) or (DEQUANT, why no kernel fits this layer here)."""
    device = torch.device(device)
    if group_size not in KERNEL_GROUP_SIZES:
        return DEQUANT, f"group_size {group_size} not in {KERNEL_GROUP_SIZES}"
    kp = padded_size(in_features, group_size)
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return DEQUANT, "this torch has no _weight_int4pack_mm_for_cpu"
        if out_features % 16:
            return DEQUANT, f"out_features {out_features} is not a multiple of 16"
        return CPU_KERNEL, None
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return DEQUANT, "the CUDA int4 kernel needs compute capability >= 8.0"
        if out_features % 8:
            return DEQUANT, f"out_features {out_features} is not a multiple of 8"
        if _inner_k_tiles(kp) is None:
            return DEQUANT, f"in_features {kp} is not a multiple of 32"
        return CUDA_KERNEL, None
    return DEQUANT, f"no int4 kernel for device type {device.type}"


def param_dtype_for(kernel: str) -> torch.dtype:
    return torch.float32 if kernel == DEQUANT else torch.bfloat16


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, ::2] | (q[:, 1::2] << 4)


def _unnibble(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def _unpack_cpu(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu` (torch 2.13): rows in blocks of 64, each block
    [K, 32] bytes with row j in the low and row j+32 in the high nibble; a tail of N % 64 rows as
    [K, tail/2] bytes with even rows low, odd rows high. Verified by tests against the codes."""
    out = torch.empty(n, k, dtype=torch.uint8, device=p.device)
    full = n // 64 * 64
    if full:
        blk = p[:full].reshape(n // 64, k, 32)
        out[:full] = torch.cat([blk & 0xF, blk >> 4], dim=-1).permute(0, 2, 1).reshape(full, k)
    if n > full:
        tail = p[full:].reshape(k, (n - full) // 2)
        out[full:] = torch.stack([tail & 0xF, tail >> 4], dim=-1).reshape(k, n - full).t()
    return out


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as packed int4 codes + per-group scale/zero, run on a real kernel.

    Build with `Int4Linear.from_linear(linear, group_size)` or `from_quantized(gq, bias)`.
    `kernel` says which path runs (`cpu-int4pack`, `cuda-int4pack` or the `dequant` fallback).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, kernel: str = CPU_KERNEL,
                 bias: bool = False, device: torch.device | str | None = None) -> None:
        """Empty storage of the right shapes (for loading a state dict); use `from_linear`/`from_quantized`."""
        super().__init__()
        if kernel not in (CPU_KERNEL, CUDA_KERNEL, DEQUANT):
            raise ValueError(f"unknown int4 kernel {kernel!r}; expected {CPU_KERNEL}, {CUDA_KERNEL} or {DEQUANT}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in_features = kp = padded_size(in_features, group_size)
        self.kernel = kernel
        self.act_dtype = None if kernel == DEQUANT else torch.bfloat16
        self.weight_dtype = torch.float32  # the dtype `.weight` reads back in (the quantized layer's)
        if kernel == CUDA_KERNEL:
            tiles = _inner_k_tiles(kp) or 2
            packed = torch.empty(out_features // 8, kp // (tiles * 16), 32, tiles // 2, dtype=torch.int32, device=device)
        else:
            packed = torch.empty(out_features, kp // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", torch.empty(kp // group_size, out_features, 2,
                                                             dtype=param_dtype_for(kernel), device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, gq: GroupQuant, bias: torch.Tensor | None = None, kernel: str | None = None,
                       device: torch.device | str | None = None) -> "Int4Linear":
        """Pack `gq` for `kernel` (default: the best one for this device and shape) on `device`."""
        device = torch.device(device if device is not None else gq.q.device)
        n = gq.q.shape[0]
        if kernel is None:
            kernel, _ = choose_kernel(device, n, gq.in_features, gq.group_size)
        layer = cls(gq.in_features, n, gq.group_size, kernel, bias is not None, device="meta")
        q = gq.q.to(device)
        if kernel == CPU_KERNEL:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        elif kernel == CUDA_KERNEL:
            hi_lo = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # this kernel wants even k in the high nibble
            packed = torch._convert_weight_to_int4pack(hi_lo, _inner_k_tiles(layer.padded_in_features))
        else:
            packed = _nibbles(q).contiguous()
        layer.qweight = packed
        sz = torch.stack([gq.scale, gq.zero], dim=-1).transpose(0, 1)  # [groups, N, 2], the kernels' layout
        layer.scales_and_zeros = sz.to(device=device, dtype=param_dtype_for(kernel)).contiguous()
        layer.bias = None if bias is None else bias.detach().to(device).clone()
        if bias is not None and bias.is_floating_point():
            layer.weight_dtype = bias.dtype
        return layer

    def optistack_spec(self) -> dict:
        """JSON description from which `from_optistack_spec` rebuilds the empty layer (optistack.load)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size,
                "kernel": self.kernel, "bias": self.bias is not None}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "Int4Linear":
        return cls(**spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, zero_point: bool = True,
                    kernel: str | None = None) -> "Int4Linear":
        w = linear.weight.detach()
        if kernel is None:
            kernel, _ = choose_kernel(w.device, w.shape[0], w.shape[1], group_size)
        gq = quantize(w, group_size, zero_point, param_dtype_for(kernel))
        layer = cls.from_quantized(gq, linear.bias, kernel, w.device)
        layer.weight_dtype = w.dtype
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized [out, in] weight on the layer's device, in the dtype of the layer it
        replaced (or of the bias, which follows casts). For model code that reads `layer.weight`
        (T5 checks `wo.weight.dtype`); each read costs a dequantization, the forward never reads it."""
        dtype = self.bias.dtype if self.bias is not None and self.bias.is_floating_point() else self.weight_dtype
        return self.dequantized_weight(dtype)

    def codes(self) -> torch.Tensor:
        """The uint8 codes [N, K padded], unpacked from the stored layout."""
        n, kp = self.out_features, self.padded_in_features
        if self.kernel == CPU_KERNEL:
            return _unpack_cpu(self.qweight, n, kp)
        if self.kernel == DEQUANT:
            return _unnibble(self.qweight)
        raise NotImplementedError("codes() is not available for the CUDA tile layout; use dequantized_weight()")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight the kernel multiplies by (scales/zeros in their stored precision)."""
        sz = self.scales_and_zeros.float()
        if self.kernel == CUDA_KERNEL:  # no unpacker for the tile layout: multiply the identity (bf16)
            eye = torch.eye(self.padded_in_features, dtype=torch.bfloat16, device=self.qweight.device)
            w = torch._weight_int4pack_mm(eye, self.qweight, self.group_size, self.scales_and_zeros.to(torch.bfloat16))
            return w.t()[:, : self.in_features].to(dtype)
        gq = GroupQuant(self.codes(), sz[..., 0].t(), sz[..., 1].t(), self.group_size, self.in_features)
        return dequantize(gq, torch.float32).to(dtype)

    def _check_device(self) -> None:
        want = {CPU_KERNEL: "cpu", CUDA_KERNEL: "cuda"}.get(self.kernel)
        if want is not None and self.qweight.device.type != want:
            raise RuntimeError(f"Int4Linear: weights were packed for {want} ({self.kernel}) but are on "
                               f"{self.qweight.device}; quantize again on the target device")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.padded_in_features != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in_features - self.in_features))
        if self.kernel == DEQUANT:
            y = x2 @ self._dequant_padded(x.dtype).t()
        else:
            self._check_device()
            sz = self.scales_and_zeros
            if sz.dtype != torch.bfloat16:  # the model was cast after quantization
                sz = sz.to(torch.bfloat16)
            xa = x2.to(torch.bfloat16).contiguous()
            if self.kernel == CPU_KERNEL:
                y = torch._weight_int4pack_mm_for_cpu(xa, self.qweight, self.group_size, sz)
            else:
                y = torch._weight_int4pack_mm(xa, self.qweight, self.group_size, sz)
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _dequant_padded(self, dtype: torch.dtype) -> torch.Tensor:
        n, g = self.out_features, self.group_size
        sz = self.scales_and_zeros.to(dtype)
        q = _unnibble(self.qweight).reshape(n, -1, g).to(dtype)
        return ((q - MID) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).reshape(n, -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel}, bias={self.bias is not None}")


def int4_parts(lin: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, Kp], scale, zero [N, Kp/g] float32) of an Int4Linear, whatever its kernel."""
    sz = lin.scales_and_zeros.float()
    scale, zero = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()
    try:
        codes = lin.codes()
    except NotImplementedError:  # CUDA tile layout: codes from the exact dequantized values
        w = F.pad(lin.dequantized_weight(), (0, lin.padded_in_features - lin.in_features))
        g = lin.group_size
        q = (w.reshape(w.shape[0], -1, g) - zero[..., None]) / scale[..., None] + MID
        codes = q.round().clamp(0, 15).to(torch.uint8).reshape(w.shape)
    return codes, scale, zero


register_module(Int4Linear, {**LINEAR_FIELDS, "group_size": integer(1, 1 << 20),
                             "kernel": choice(CPU_KERNEL, CUDA_KERNEL, DEQUANT)})
