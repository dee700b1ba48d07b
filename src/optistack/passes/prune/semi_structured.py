"""`prune-2:4`: semi-structured 2:4 sparsity: in every group of 4 consecutive input weights of each
output row, the 2 with the highest score are kept and the other 2 zeroed (50% sparsity).

Scores: `wanda` (|W_ij| * ||X_j||_2, statistics gathered block by block as in `prune-wanda`; needs
a workload with calibration inputs) or `magnitude` (|W_ij|, no data needed). Layers whose
in_features is not a multiple of 4 are left dense and counted in `info["linears_skipped_shape"]`.

Speed: only on CUDA GPUs with compute capability >= 8.0, where each pruned weight is converted with
`torch.sparse.to_sparse_semi_structured` (cuSPARSELt, for fp16/bf16/int8/fp8 weights) or torch's
CUTLASS 2:4 format (fp32 weights), so `F.linear` runs the sparse tensor-core kernels. A layer whose
conversion is refused (shape or dtype constraints) or whose sparse output does not match the dense
one stays dense and is counted in `info["linears_dense"]`. On CPU there are no 2:4 kernels: weights
stay dense tensors with zeros and the pass is an accuracy study only
(`info["speed_path"] = "none on CPU: dense kernels, accuracy only"`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from ...core.config import PassConfig, check, check_regex
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import need_cuda
from ..linears import features, find_linears, is_conv1d, weight_rows
from .wanda import calibration_batches, prune_with_stats, wanda_scores

CPU_SPEED_PATH = "none on CPU: dense kernels, accuracy only"


@dataclasses.dataclass(frozen=True)
class SemiStructuredConfig(PassConfig):
    score: Literal["wanda", "magnitude"] = "wanda"
    calib_samples: int = 16
    skip: str = "lm_head|embed"

    def __post_init__(self) -> None:
        check(self.calib_samples >= 1, f"prune-2:4: option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check_regex("prune-2:4", "skip", self.skip)


def zero_two_of_four(weight: torch.Tensor, score: torch.Tensor) -> None:
    """In each group of 4 consecutive columns of every row, zero the 2 lowest-scoring entries, in place."""
    rows, cols = weight.shape
    idx = torch.topk(score.reshape(rows, cols // 4, 4), 2, dim=-1, largest=False, sorted=False).indices
    drop = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=weight.device).scatter_(-1, idx, True)
    weight.masked_fill_(drop.reshape(rows, cols), 0.0)


def _to_sparse_kernel(weight: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(semi-structured tensor, backend) for a pruned CUDA weight, or (None, why not)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as Cslt
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    w = weight.detach().contiguous()
    cslt_ok = torch.backends.cusparselt.is_available() and w.dtype in Cslt._DTYPE_SHAPE_CONSTRAINTS
    try:
        sparse = torch.sparse.to_sparse_semi_structured(w) if cslt_ok else Cutlass.from_dense(w)
    except (RuntimeError, ValueError, TypeError) as exc:
        return None, str(exc).split("\n")[0]
    # Guard against a kernel this GPU/build cannot run correctly: compare with the dense result.
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(64, w.shape[1], device=w.device, dtype=w.dtype, generator=gen)
    try:
        got = torch.nn.functional.linear(x, sparse)
    except (RuntimeError, NotImplementedError) as exc:
        return None, str(exc).split("\n")[0]
    want = torch.nn.functional.linear(x, w)
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))
    if not err < 1e-2:
        return None, f"sparse result differs from dense (relative error {err:.3g})"
    return sparse, "cusparselt" if cslt_ok else "cutlass"


class SemiStructuredPrunePass(ConfiguredPass):
    """2:4 semi-structured pruning of Linear weights; sparse kernels on CUDA >= 8.0, accuracy only on CPU."""

    name = "prune-2:4"
    Config = SemiStructuredConfig
    takes = frozenset({MODULE})
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"{self.name}: expected a torch.nn.Module, got {type(model).__name__}")
        found = find_linears(model, self.config.skip, one_per_weight=True)
        layers = {n: m for n, m in found.items() if features(m)[0] % 4 == 0}
        if not layers:
            return PassResult(model, modified=False, info={"linears_pruned": 0, "reason": (
                f"nothing to change: no nn.Linear or Conv1D layer with float weights and in_features a multiple "
                f"of 4 outside skip={self.config.skip!r} ({len(found)} layers with other widths)")})
        info: dict[str, Any] = {"score": self.config.score, "linears_pruned": len(layers),
                                "linears_skipped_shape": len(found) - len(layers)}
        if self.config.score == "wanda":
            batches = calibration_batches(model, ctx, self.config.calib_samples, self.name,
                                          hint="; use score=magnitude to prune without data")

            def prune(_name: str, m: torch.nn.Linear, l2: torch.Tensor | None) -> None:
                w = weight_rows(m)  # [out, in]; a view of a Conv1D's weight
                zero_two_of_four(w, wanda_scores(w, l2))

            info.update(prune_with_stats(model, batches, layers, prune), calib_samples=len(batches))
        else:
            with torch.no_grad():
                for m in layers.values():
                    w = weight_rows(m)
                    zero_two_of_four(w, w.detach().abs().float())
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        total = sum(m.weight.numel() for m in layers.values())
        info.update(sparsity=round(zeros / total, 6), weights_zeroed=zeros, weights_total=total)
        info.update(self._convert(layers))
        return PassResult(model, modified=True, info=info)

    def _convert(self, layers: dict[str, torch.nn.Linear]) -> dict[str, Any]:
        device = next(iter(layers.values())).weight.device
        if device.type != "cuda":
            return {"speed_path": CPU_SPEED_PATH}
        avail = need_cuda((8, 0))
        if not avail:
            return {"speed_path": f"none: {avail.reason}; dense kernels, accuracy only"}
        converted, backends, why = 0, set(), ""
        with torch.no_grad():
            for m in layers.values():
                if is_conv1d(m):  # its forward is addmm with a [in, out] weight: no sparse kernel there
                    why = why or "Conv1D layers stay dense"
                    continue
                sparse, backend = _to_sparse_kernel(m.weight)
                if sparse is None:
                    why = why or backend
                    continue
                m.weight = torch.nn.Parameter(sparse, requires_grad=False)
                converted += 1
                backends.add(backend)
        info: dict[str, Any] = {"speed_path": "semi-structured sparse kernels (" + ",".join(sorted(backends)) + ")"
                                if converted else "none: no layer could be converted; dense kernels, accuracy only",
                                "linears_sparse_kernel": converted, "linears_dense": len(layers) - converted}
        if why:
            info["dense_reason"] = why
        return info
