"""Summing GPTQ's H = 2 X^T X / n block by block (`gptq`, `mixed-precision`, the AWQ checks).

Why a room of its own: the sequential calibration (each block's H from the rounded blocks' outputs, memory at
one block's activations) is shared by every pass that rounds by H, and the checks that judge AWQ's scales hook
into it before each block (`before_block`) and after the last (`after_blocks`).
"""
from __future__ import annotations

from typing import Any

from ..calibration import capture_block_inputs, with_hidden
from ..linears import weight_rows


class Hessians:
    """Forward pre-hooks that sum X^T X of each layer's inputs; a tensor read by several layers in one
    call is multiplied once. Call `next_call()` after each forward so cached products are dropped."""

    def __init__(self, layers: dict[str, Any]) -> None:
        from .gptq_solver import HessianSum

        self.layers = layers
        self.sums = {n: HessianSum(weight_rows(m).shape[1], m.weight.device) for n, m in layers.items()}
        self._cache: dict[int, tuple[Any, Any]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "Hessians":
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    def _hook(self, name: str) -> Any:
        def hook(_m: Any, args: tuple) -> None:
            x = args[0]
            seen = self._cache.get(id(x))
            product = seen[1] if seen is not None and seen[0] is x else None
            self._cache[id(x)] = (x, self.sums[name].add(x, product))  # keeps x alive: ids stay unique
        return hook

    def next_call(self) -> None:
        self._cache.clear()


def hessian_sums(layers: dict[str, Any], module: Any, calls: list) -> dict[str, Any]:
    """The X^T X sums (`HessianSum`) of `layers`' inputs while `module` runs on each (args, kwargs) of `calls`."""
    with Hessians(layers) as hs:
        for args, kwargs in calls:
            module(*args, **kwargs)
            hs.next_call()
    return hs.sums


def block_output(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def calibrate_and_round(model: Any, batches: list, layers: dict[str, Any], round_layer: Any, label: str,
                        before_block: Any = None, after_blocks: Any = None) -> str:
    """Sum H for `layers` block by block (or in one pass) and call `round_layer(name, H)` on each;
    returns "sequential" or "single-pass". `before_block(block, inputs, layers of it)`: called with every
    block's inputs before its H is summed; `after_blocks()`: once the blocks are rounded, before the layers
    outside them (sequential only)."""
    import torch

    from ..prune.wanda import decoder_blocks
    from .awq import progress_bar

    done: set[str] = set()
    mode = "single-pass"
    with torch.no_grad():
        blocks = decoder_blocks(model)
        inputs = capture_block_inputs(model, blocks[0], batches) if blocks is not None else []
        if blocks is not None and len(inputs) == len(batches):
            mode = "sequential"
            with progress_bar(len(blocks), f"{label}: calibrating blocks") as advance:
                for block in blocks:
                    inside = {id(m) for m in block.modules()}
                    mine = {n: m for n, m in layers.items() if id(m) in inside}
                    if before_block is not None:
                        before_block(block, inputs, mine)
                    if mine:
                        sums = hessian_sums(mine, block, inputs)
                        for n in mine:
                            round_layer(n, sums[n])
                            done.add(n)
                    if block is not blocks[-1]:  # the rounded block gives the next one its inputs
                        inputs = [with_hidden(inp, block_output(block(*inp[0], **inp[1]))) for inp in inputs]
                    advance()
            if after_blocks is not None:
                after_blocks()
        del inputs
        rest = {n: m for n, m in layers.items() if n not in done}
        if rest:
            sums = hessian_sums(rest, model, batches)
            for n in rest:
                round_layer(n, sums[n])
    return mode
