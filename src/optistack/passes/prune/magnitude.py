"""`prune-magnitude`: zero the smallest-magnitude weights of linear layers (unstructured sparsity).

Layers are picked by `passes/linears.py` (nn.Linear and transformers Conv1D); a weight tied to
several modules is pruned once, for all of them.

`scope=layer` zeroes the `sparsity` fraction of each layer's weights; `scope=global` ranks all
eligible weights together, so layers with many small weights lose more. The zeros are written into
the ordinary dense weight tensors: no masks, hooks or parametrizations remain, so the model saves,
copies and compiles like the original. Biases are never pruned.

Speed: none on its own. Dense CPU/GPU matmul kernels do the same work whether a weight is zero or
not. Use this pass to study accuracy at a sparsity level, to shrink a compressed checkpoint, or
ahead of a pass that exploits sparsity (2:4 semi-structured kernels, sparse formats); for speed on
dense kernels use `prune-structured`, which removes whole neurons.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ...core.config import PassConfig, check, check_regex
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..linears import find_linears


@dataclasses.dataclass(frozen=True)
class MagnitudePruneConfig(PassConfig):
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    skip: str = "lm_head|embed"

    def __post_init__(self) -> None:
        check(
            0.0 < self.sparsity < 1.0,
            f"prune-magnitude: option 'sparsity' must be between 0 and 1 (exclusive), the fraction of "
            f"weights set to zero; got {self.sparsity}",
        )
        check_regex("prune-magnitude", "skip", self.skip)


def _zero_smallest(weight: Any, k: int) -> None:
    """Zero exactly the `k` smallest-|w| entries of `weight` in place (ties broken arbitrarily)."""
    import torch

    if k <= 0:
        return
    idx = torch.topk(weight.detach().abs().reshape(-1).float(), k, largest=False, sorted=False).indices
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    mask.view(-1)[idx] = True
    weight.masked_fill_(mask, 0.0)


def _zero_global(weights: list[Any], sparsity: float) -> None:
    """Zero the `sparsity` fraction of smallest-|w| entries across all `weights` together."""
    import torch

    mags = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
    k = round(sparsity * mags.numel())
    if k <= 0:
        return
    threshold = torch.kthvalue(mags.cpu(), k).values.item()
    del mags
    # Everything strictly below the threshold goes; then just enough entries equal to it.
    ties_left = k - sum(int((w.float().abs() < threshold).sum()) for w in weights)
    for w in weights:
        mag = w.detach().float().abs()
        mask = mag < threshold
        if ties_left > 0:
            pos = (mag == threshold).reshape(-1).nonzero().squeeze(1)[:ties_left]
            mask.view(-1)[pos] = True
            ties_left -= pos.numel()
        w.masked_fill_(mask, 0.0)


class MagnitudePrunePass(ConfiguredPass):
    """Unstructured magnitude pruning of nn.Linear weights; accuracy study only, no dense speedup."""

    name = "prune-magnitude"
    Config = MagnitudePruneConfig
    takes = frozenset({MODULE})
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"{self.name}: expected a torch.nn.Module, got {type(model).__name__}")
        layers = list(find_linears(model, self.config.skip, one_per_weight=True).items())  # tied weights once
        if not layers:
            return PassResult(model, modified=False, info={"linears_pruned": 0, "reason": (
                f"nothing to change: no nn.Linear or Conv1D layer with float weights outside "
                f"skip={self.config.skip!r}")})
        s = self.config.sparsity
        with torch.no_grad():
            if self.config.scope == "layer":
                for _, m in layers:
                    _zero_smallest(m.weight, round(s * m.weight.numel()))
            else:
                _zero_global([m.weight for _, m in layers], s)
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        total = sum(m.weight.numel() for _, m in layers)
        info = {
            "linears_pruned": len(layers),
            "sparsity": round(zeros / total, 6),
            "weights_zeroed": zeros,
            "weights_total": total,
        }
        return PassResult(model, modified=True, info=info)
