"""The decode engine's int4 matrices (`Q4Projection`) made from whatever int4 layers a model holds.

Every int4 form a pipeline leaves (`Int4Linear`, fuse-kernels' `FusedInt4Linear`, decode-engine's own
`EngineInt4Linear`) is read as codes, scales and zero points on its group grid (`int4_grid`) and repacked
into the engine's unit layout (64 input channels a unit: 32 bytes of codes, a scale and a zero term;
csrc/cpu/int4_q8_gemv.cpp); layers already in that layout (a loaded model) are taken as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

UNIT = 64  # input channels per scale unit of the engine layout


def int4_grid(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(codes uint8 [N, K padded], scale, zero float32 [N, groups], group size) of any int4 form a pipeline
    leaves (w = (code - 8) * scale + zero): `Int4Linear`, fuse-kernels' CPU `FusedInt4Linear`, decode-engine's
    `EngineInt4Linear` (per 64-channel unit); None for another kind. Save formats read it too."""
    from ..layers.int4 import Int4Linear
    from .engine_linear import EngineInt4Linear
    from .modules import FusedInt4Linear

    if isinstance(lin, Int4Linear):
        from ..layers.int4 import int4_parts

        codes, scale, zero = int4_parts(lin)
        return codes.cpu(), scale.cpu(), zero.cpu(), lin.group_size
    if isinstance(lin, FusedInt4Linear) and lin.backend == "cpu-cpp":
        from .cpu import int4_unpack

        packed = lin.packed()
        codes = int4_unpack(packed["qweight"], lin.out_features, lin.packed_k)
        return codes, packed["scale"].float(), packed["zero"].float(), lin.group_size
    if isinstance(lin, EngineInt4Linear):
        s = lin.s.float()
        return lin.codes(), s, lin.zc.float() + 8 * s, UNIT
    return None


def _int4_parts(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`int4_grid` with the codes cut to the layer's real input width."""
    grid = int4_grid(lin)
    if grid is None:
        raise ValueError(f"{type(lin).__name__} is not an int4 layer the engine reads")
    codes, scale, zero, group = grid
    return codes[:, : lin.in_features], scale, zero, group


def _units(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> list[torch.Tensor]:
    """[packed uint8 [N, K/2], unit scale, unit zc float32 [N, K/64]] in the engine layout."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // UNIT, 2, UNIT // 2)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    units, rep = k // UNIT, group // UNIT  # unit u lies in group u // rep (a padded last group included)
    s, z = scale.float(), zero.float()
    return [packed, s.repeat_interleave(rep, dim=1)[:, :units].contiguous(),
            (z - 8 * s).repeat_interleave(rep, dim=1)[:, :units].contiguous()]


def _halved(s: torch.Tensor, zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """s and zc as float16 when that moves no weight by more than 1% of its quantization step (scales in
    float16's normal range: a relative error of 2^-11), else None (the projection keeps float32)."""
    s16, zc16 = s.half(), zc.half()
    if not (torch.isfinite(s16).all() and torch.isfinite(zc16).all()):
        return None
    step = s.abs()
    # a weight is q * s + zc, q <= 15: its error is at most 15 |ds| + |dzc|
    err = 15 * (s16.float() - s).abs() + (zc16.float() - zc).abs()
    return (s16, zc16) if bool((err <= 0.01 * step).all()) else None


def _projection(lins: list[nn.Module], scales: str = "float32") -> "Q4Projection":
    """One engine projection: the rows of `lins` one after the other; unit scales and zc in `scales`
    (float16 where every unit's weights stay within 1% of a quantization step of float32's)."""
    from .engine_linear import EngineInt4Linear

    biases = [getattr(lin, "bias", None) for lin in lins]
    bias = torch.empty(0)
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach().float() if b is not None else torch.zeros(lin.out_features)
                          for b, lin in zip(biases, lins)]).contiguous()
    if all(isinstance(lin, EngineInt4Linear) for lin in lins):  # the engine's own layout already: no round trip
        want = torch.float16 if scales == "float16" else torch.float32
        if all(lin.s.dtype == want and lin.zc.dtype == want for lin in lins):
            return _adopted(lins, bias)
        packed, s, zc = ([getattr(lin, a) for lin in lins] for a in ("q", "s", "zc"))
        s, zc = [t.float() for t in s], [t.float() for t in zc]  # float16 -> float32 is exact
    else:
        packed, s, zc = zip(*(_units(*_int4_parts(lin)) for lin in lins))
    s_all, zc_all = torch.cat(s).contiguous(), torch.cat(zc).contiguous()
    if scales == "float16":
        s_all, zc_all = _halved(s_all, zc_all) or (s_all, zc_all)
    return Q4Projection(torch.cat(packed).contiguous(), s_all, zc_all, bias)


def _adopted(lins: list[Any], bias: torch.Tensor) -> "Q4Projection":
    """Layers already in the engine's layout and scale type (a loaded model's): one layer's own tensors, or
    several stacked, each layer's buffers then pointed at its rows of the stack (the same values). So a
    loaded model's weights are not held twice while the engine is built (a 1.1B Llama loaded: peak resident
    1.93 -> 1.38 GB, docs/saving-and-loading.md)."""
    if len(lins) == 1:
        lin = lins[0]
        return Q4Projection(lin.q.contiguous(), lin.s.contiguous(), lin.zc.contiguous(), bias)
    q, s, zc = (torch.cat([getattr(lin, a) for lin in lins]) for a in ("q", "s", "zc"))
    rows = 0
    for lin in lins:
        n = lin.out_features
        lin.q, lin.s, lin.zc = q[rows:rows + n], s[rows:rows + n], zc[rows:rows + n]
        if lin.bias is not None:
            lin.bias = bias[rows:rows + n]
        rows += n
    return Q4Projection(q, s, zc, bias)


@dataclass
class Q4Projection:
    """An int4 matrix in the engine layout: codes uint8 [N, K/2], unit scale and zc [N, K/64] (float32, or
    float16: 36 bytes a unit of 64 weights instead of 40), bias [N] or empty."""

    q: torch.Tensor
    s: torch.Tensor
    zc: torch.Tensor
    bias: torch.Tensor
    panels: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # see with_panels

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def __getstate__(self) -> dict:  # panels are made again where wanted, never saved or copied
        return {**self.__dict__, "panels": None}

    def with_panels(self, lib: Any) -> None:
        """Adds the same weights as panels of 16 rows (csrc/cpu/int4_panel.h), made once and shared by every
        engine built from them: a second copy of the codes, for ~1.3x a decode row and ~1.6x a batch of eight
        on a CPU without AMX (SmolLM2, Zen 4, 2 threads; docs/decoding.md)."""
        if self.panels is None and self.out_features % 16 == 0:
            self.panels = tuple(lib.q4_panels(self.q, self.s, self.zc))

    def native(self, lib: Any, panels: bool = False) -> Any:
        p = lib.Q4Proj()
        p.q, p.s, p.zc, p.bias = self.q, self.s, self.zc, self.bias
        if panels and self.panels is not None:
            p.pq, p.pf = self.panels
        return p
