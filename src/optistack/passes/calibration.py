"""Per-input-channel activation statistics of Linear layers, gathered on calibration batches.

Shared by activation-aware passes: AWQ scales channels by mean |x|, Wanda scores weights by ||x||_2.
"""
from __future__ import annotations

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


def input_channel_stats(model: torch.nn.Module, batches: Iterable[Any], layers: dict[str, torch.nn.Linear],
                        call: Callable[[torch.nn.Module, Any], Any] | None = None) -> dict[str, ChannelStats]:
    """Run `batches` through `model` (inputs as `(args, kwargs)`), summing |x| and x^2 per input channel."""
    from .linears import features

    stats = {name: ChannelStats(torch.zeros(features(m)[0], dtype=torch.float64),
                                torch.zeros(features(m)[0], dtype=torch.float64)) for name, m in layers.items()}

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


# Block-by-block calibration (Wanda, AWQ) replays decoder blocks on captured inputs; a KV cache the
# model passed in would grow with every replay, so it is dropped from the captured kwargs.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _Captured(Exception):
    pass


def capture_block_inputs(model: torch.nn.Module, block: torch.nn.Module, batches: Iterable[Any]) -> list[Any]:
    """The (args, kwargs) `block` is called with for each batch; the model stops at the block."""
    seen: list[Any] = []

    def hook(_m: Any, args: tuple, kwargs: dict) -> None:
        seen.append((args, {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                try:
                    model(*args, **kwargs)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return seen


def with_hidden(inp: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The captured block call with its hidden states replaced (the next block's input)."""
    args, kwargs = inp
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
