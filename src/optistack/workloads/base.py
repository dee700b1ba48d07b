"""Timing streams for workloads: `vary_inputs` is the rule the generic workload uses to derive an
endless stream of distinct batches from one example batch; other workloads can reuse it (see
`DerivedTimingBatches`). What a workload is (the `Workload` protocol, `Metric`, `timing_batch`,
`run_on`, `batch_digest`) is the contract in `optistack.core.workload`, which the instruments speak
too: a new use case (a vision model, a reranker) is a new workload, not a change to the benchmark.
"""
from __future__ import annotations

import math
from typing import Any

from ..core.modeling import Inputs  # one call's inputs: model(*args, **kwargs)


class DerivedTimingBatches:
    """Mixin: a timing stream derived from one example batch by `vary_inputs`.

    A workload whose `run(model, batch)` takes `Inputs` gets `timing_batch` by defining
    `timing_example()` (one batch in its calling convention, ideally not one it scores).
    """

    def timing_example(self) -> Inputs:
        raise NotImplementedError

    def timing_batch(self, index: int) -> Inputs:
        return vary_inputs(self.timing_example(), index)


def vary_inputs(inputs: Inputs, index: int, resample_ints: bool = True) -> Inputs:
    """A distinct batch of the same shapes and dtypes as `inputs`, deterministic in `index`.

    The rule, per tensor: rows (dim 0, when longer than 1) are permuted, with one permutation for all
    tensors of the same length so paired inputs (ids and their mask) stay aligned; floating tensors get
    Gaussian noise of 1% of their standard deviation, except masks (all values 0 or 1), which are only
    permuted; integer tensors with more than two distinct values (token ids, indices) have about half
    their elements replaced by values drawn from that same tensor, so every value stays one the model
    already accepted (`resample_ints=False` keeps them, for index inputs with structure such as
    sorted offsets: integer and boolean tensors are then left as they are, and floats get their noise
    without a permutation, so rows stay aligned); booleans and integer masks are only permuted.
    Non-tensors pass through.
    """
    import torch

    gen = torch.Generator().manual_seed(0x0B5E55ED + 7919 * int(index))
    perms: dict[int, Any] = {}

    def vary(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return _vary_tensor(x, gen, perms, resample_ints)
        if isinstance(x, dict):
            return {k: vary(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(vary(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(vary(v) for v in x)
        return x

    args, kwargs = inputs
    return tuple(vary(a) for a in args), {k: vary(v) for k, v in kwargs.items()}


def _vary_tensor(x: Any, gen: Any, perms: dict[int, Any], resample_ints: bool) -> Any:
    import torch

    src = x.detach().to("cpu", copy=True)  # never shares memory with the example batch
    if not resample_ints and not src.is_floating_point():
        return src.to(x.device)
    if resample_ints and src.dim() >= 1 and src.shape[0] > 1:
        perm = perms.get(src.shape[0])
        if perm is None:
            perm = perms[src.shape[0]] = torch.randperm(src.shape[0], generator=gen)
        src = src[perm]
    if src.numel() == 0 or src.dtype == torch.bool or src.is_complex():
        pass
    elif src.is_floating_point():
        f = src.float()
        finite = f[torch.isfinite(f)]
        is_mask = finite.numel() == f.numel() and bool(((f == 0) | (f == 1)).all())
        if not is_mask:
            scale = float(finite.std()) if finite.numel() > 1 else 0.0
            if not math.isfinite(scale) or scale == 0.0:
                scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
            src = (f + torch.randn(f.shape, generator=gen) * (0.01 * scale)).to(src.dtype)
    elif resample_ints:
        values = torch.unique(src)
        if values.numel() > 2:
            flat = src.reshape(-1).clone()
            pick = torch.rand(flat.shape, generator=gen) < 0.5
            flat[pick] = values[torch.randint(values.numel(), (int(pick.sum()),), generator=gen)]
            src = flat.view(src.shape)
    return src.to(x.device)
