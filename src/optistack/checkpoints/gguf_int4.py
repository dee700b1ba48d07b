"""Every int4 form a pipeline leaves, as what `save_gguf` writes: codes, per-group scale and zero, the weight.

`rtn-int4`/`awq`/`gptq` leave `Int4Linear`; `fuse-kernels` repacks it into `FusedInt4Linear` (and stacks an
MLP's gate and up rows into one `gate_up`); `decode-engine` leaves `EngineInt4Linear` views of its own
matrices. `@llm-decode`'s model holds the last two, so a GGUF of what the user deploys needs all three:
`int4_form` reads each back to the same codes and grid (w = (code - 8) * scale + zero), and `RowSlice`
names rows of a stacked projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Int4Form:
    codes: torch.Tensor   # uint8 [N, K padded], 0..15
    scale: torch.Tensor   # float32 [N, groups]
    zero: torch.Tensor    # float32 [N, groups]: w = (code - 8) * scale + zero
    group_size: int
    in_features: int
    weight: torch.Tensor  # our own dequantized float32 [N, in_features]
    label: str            # the layer kind, for the summary

    def rows(self, start: int, stop: int) -> "Int4Form":
        return Int4Form(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop], self.group_size,
                        self.in_features, self.weight[start:stop], self.label)


@dataclass
class RowSlice:
    """Rows [start, stop) of a stacked projection (fuse-kernels' gate|up), written as a tensor of its own."""

    module: Any
    start: int
    stop: int

    @property
    def out_features(self) -> int:
        return self.stop - self.start


def int4_form(module: Any) -> Int4Form | None:
    """The int4 grid of `module` (any of the forms above, or a RowSlice of one), or None for another kind."""
    from ..kernels.llama_engine import int4_grid

    if isinstance(module, RowSlice):
        inner = int4_form(module.module)
        return None if inner is None else inner.rows(module.start, module.stop)
    grid = int4_grid(module)
    if grid is None:
        return None
    codes, scale, zero, group = grid
    weight = module.dequantized_weight(torch.float32) if hasattr(module, "dequantized_weight") else module.weight
    label = {"Int4Linear": "int4", "FusedInt4Linear": "int4 (fused)"}.get(type(module).__name__,
                                                                         "int4 (decode engine)")
    return Int4Form(codes, scale, zero, group, module.in_features, weight.float().cpu(), label)


def stacked_rows(model: Any, name: str) -> RowSlice | None:
    """`mlp.gate_proj` / `mlp.up_proj` of a model whose MLP fuse-kernels stacked into `mlp.gate_up`."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in ("gate_proj", "up_proj"):
        return None
    try:
        stacked = model.get_submodule(f"{parent}.gate_up")
    except AttributeError:
        return None
    half = stacked.out_features // 2
    return RowSlice(stacked, 0, half) if leaf == "gate_proj" else RowSlice(stacked, half, 2 * half)
