"""`EngineInt4Linear`: a projection whose int4 weight is rows of the decode engine's own matrices.

After `decode-engine` packs the model's int4 projections into the engine's layout (llama_engine.py), the
model still needs its projections: for the prompt where the model's forward runs it, for evaluation, for
decoding the engine cannot serve. Keeping the int4 modules beside the engine held every weight twice
(a 1.1B Llama: 520 MB twice). `share_engine_weights(model, weights)` swaps each projection for one of
these, whose buffers are views of the engine's tensors (q, k and v are row ranges of the engine's stacked
q|k|v matrix), so the process holds one copy. The forward runs the engine's own kernels
(csrc/cpu/q4_linear.cpp): int16 activations (the engine's exact mode) for a few rows; for many, AMX-BF16 tiles
where the CPU has them (bf16 activations, as the int4 modules' own prefill kernels round them), else the
engine's int8 chunk GEMM (int8 activations per 64 channels, as the engine's decode rows).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.load_registry import LINEAR_FIELDS, register_module
from ..core.load_schema import choice, integer

UNIT = 64
PATH_INT16, PATH_AMX_BF16, PATH_INT8_GEMM = 0, 2, 4


class EngineInt4Linear(nn.Module):
    """y = x W^T + b, W in the engine's unit layout: codes `q` uint8 [N, K/2] (byte j of a unit: channel j
    in the low nibble, j + 32 in the high one), per-unit scale `s` and zero term `zc` [N, K/64] (float32 or
    float16), w = code * s + zc. `group_size` is the grid the weights were quantized on (a multiple of 64)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, scales: str = "float32",
                 bias: bool = False) -> None:
        super().__init__()
        if in_features % UNIT or group_size % UNIT:
            raise ValueError(f"EngineInt4Linear needs in_features and group_size multiples of {UNIT}; got "
                             f"{in_features} and {group_size}")
        if scales not in ("float32", "float16"):
            raise ValueError(f"EngineInt4Linear: scales must be 'float32' or 'float16'; got {scales!r}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        dtype = getattr(torch, scales)
        units = in_features // UNIT
        self.register_buffer("q", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("s", torch.empty(out_features, units, dtype=dtype))
        self.register_buffer("zc", torch.empty(out_features, units, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def rows_of(cls, proj: Any, start: int, stop: int, in_features: int, group_size: int) -> "EngineInt4Linear":
        """Rows [start, stop) of an engine `Q4Projection`, sharing its storage (rows are contiguous)."""
        has_bias = proj.bias.numel() > 0
        new = cls(in_features, stop - start, group_size, str(proj.s.dtype).removeprefix("torch."), has_bias)
        new.q, new.s, new.zc = proj.q[start:stop], proj.s[start:stop], proj.zc[start:stop]
        if has_bias:
            new.bias = proj.bias[start:stop]
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import cpu

        if x.device.type != "cpu":
            raise RuntimeError(f"EngineInt4Linear runs on the CPU (the decode engine's kernels); x is on {x.device}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"EngineInt4Linear expects {self.in_features} input features; x has {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        lib = cpu.lib()
        amx = lib.amx_supported()
        path = (PATH_AMX_BF16 if amx and x2.shape[0] > cpu.PREFILL_BF16_ROWS else
                PATH_INT8_GEMM if not amx and x2.shape[0] >= lib.gemm_rows_default else PATH_INT16)
        bias = self.bias if self.bias is not None else torch.empty(0)
        y = lib.q4_linear(x2, self.q, self.s, self.zc, bias, path)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] codes 0..15 in natural channel order."""
        n, k = self.out_features, self.in_features
        b = self.q.reshape(n, k // UNIT, 1, UNIT // 2)
        return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, k)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized float32 [out, in] weight (for model code that reads `layer.weight`)."""
        n, k = self.out_features, self.in_features
        w = self.codes().float().reshape(n, k // UNIT, UNIT) * self.s.float()[..., None] + self.zc.float()[..., None]
        return w.reshape(n, k)

    def optistack_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size,
                "scales": str(self.s.dtype).removeprefix("torch."), "bias": self.bias is not None}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "EngineInt4Linear":
        return cls(spec["in_features"], spec["out_features"], spec["group_size"], spec["scales"], spec["bias"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scales={str(self.s.dtype).removeprefix('torch.')} (the decode engine's weights)")


ENGINE_INT4_FIELDS = {**LINEAR_FIELDS, "group_size": integer(UNIT, 1 << 20), "scales": choice("float32", "float16")}
register_module(EngineInt4Linear, ENGINE_INT4_FIELDS)


def _group(lin: nn.Module) -> int:
    return int(getattr(lin, "group_size", UNIT))


def share_engine_weights(model: Any, weights: Any) -> int:
    """Swap the int4 projections of `model` (a Llama-family model `weights` was built from) for views of the
    engine's matrices; returns the bytes of int4 weights no longer held twice. The swap is all or nothing:
    every replacement is built before the first one is set."""
    from .llama_engine import _layer_projections

    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    freed = 0
    for layer, block in zip(model.model.layers, weights.blocks):
        p = _layer_projections(layer)
        attn, mlp = layer.self_attn, layer.mlp
        rows = 0
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = p[f"self_attn.{name}"]
            swaps.append((attn, name, EngineInt4Linear.rows_of(block.qkv, rows, rows + lin.out_features,
                                                               lin.in_features, _group(lin))))
            rows += lin.out_features
        swaps.append((attn, "o_proj", _whole(block.o, p["self_attn.o_proj"])))
        if "mlp.gate_up" in p:
            swaps.append((mlp, "gate_up", _whole(block.gate_up, p["mlp.gate_up"])))
        else:
            gate = p["mlp.gate_proj"]
            swaps.append((mlp, "gate_proj", EngineInt4Linear.rows_of(block.gate_up, 0, gate.out_features,
                                                                     gate.in_features, _group(gate))))
            up = p["mlp.up_proj"]
            swaps.append((mlp, "up_proj", EngineInt4Linear.rows_of(
                block.gate_up, gate.out_features, gate.out_features + up.out_features, up.in_features, _group(up))))
        swaps.append((mlp, "down_proj", _whole(block.down, p["mlp.down_proj"])))
    head = model.get_output_embeddings()
    if weights.head4 is not None:
        swaps.append((model, _child_name(model, head), _whole(weights.head4, head)))
    for parent, name, new in swaps:
        old = getattr(parent, name)
        freed += sum(t.numel() * t.element_size() for t in (*old.parameters(), *old.buffers()))
        setattr(parent, name, new)
    return freed


def _whole(proj: Any, lin: nn.Module) -> EngineInt4Linear:
    return EngineInt4Linear.rows_of(proj, 0, proj.out_features, lin.in_features, _group(lin))


def _child_name(model: nn.Module, child: nn.Module) -> str:
    for name, m in model.named_children():
        if m is child:
            return name
    raise ValueError("the output head is not a direct child of the model; cannot share the engine's int4 head")
