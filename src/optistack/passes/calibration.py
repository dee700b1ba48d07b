"""Per-input-channel activation statistics of Linear layers, gathered on calibration batches.

Shared by activation-aware passes: AWQ scales channels by mean |x|, Wanda scores weights by ||x||_2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


@dataclass
class ChannelStats:
    """Running sums over every token seen by one Linear's input (float64 for long calibrations)."""

    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def l2(self) -> torch.Tensor:
        """||x_j||_2 over all calibration tokens, as Wanda defines it."""
        return self.sq_sum.sqrt().float()


def linear_layers(model: torch.nn.Module, skip: str = "") -> dict[str, torch.nn.Linear]:
    pattern = re.compile(skip) if skip else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not (pattern and pattern.search(name))}


def input_channel_stats(model: torch.nn.Module, batches: Iterable[Any], layers: dict[str, torch.nn.Linear],
                        call: Callable[[torch.nn.Module, Any], Any] | None = None) -> dict[str, ChannelStats]:
    """Run `batches` through `model` (inputs as `(args, kwargs)`), summing |x| and x^2 per input channel."""
    stats = {name: ChannelStats(torch.zeros(m.in_features, dtype=torch.float64),
                                torch.zeros(m.in_features, dtype=torch.float64)) for name, m in layers.items()}

    def hook_for(name: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            s = stats[name]
            s.abs_sum += x.abs().sum(0).cpu()
            s.sq_sum += x.pow(2).sum(0).cpu()
            s.tokens += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                if call is not None:
                    call(model, batch)
                else:
                    args, kwargs = batch
                    model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats
