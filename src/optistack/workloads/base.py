"""What a workload is: a model, the batches it is timed on, and how its outputs are scored.

The instrument only talks to this protocol, so a new use case (a vision model, a reranker) is a new
workload, not a change to the benchmark.

Timing batches (optional, but every bundled workload has them): `timing_batch(index)` returns the
index-th batch of an endless stream of distinct batches of one shape, never drawn from the data
`evaluate` scores, and `run(model, batch)` calls the model on it. The instrument gives each timed round
a fresh batch, so a model that caches outputs for repeated inputs gains nothing. A workload without
`timing_batch` is timed on its one `run(model)` batch, and the report says so. `vary_inputs` is the
rule the generic workload uses to derive such a stream from one example batch; other workloads can
reuse it (see `DerivedTimingBatches`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Protocol, runtime_checkable

from ..core.modeling import Inputs  # one call's inputs: model(*args, **kwargs)


@dataclass(frozen=True)
class Metric:
    """The accuracy metric and its direction: never guessed, always declared.

    `scale` says how a drop is measured: "relative" (a fraction of the before value: cosine 1.0 ->
    0.99 is a drop of 0.01; perplexity 12.5 -> 12.625 is a drop of 0.01) or "absolute" (for metrics
    whose reference value is 0, like relative output error: 0 -> 0.01 is a drop of 0.01).
    """

    name: str
    higher_is_better: bool
    scale: Literal["relative", "absolute"] = "relative"

    def drop(self, before: float, after: float) -> float:
        """How much worse `after` is than `before` (positive = worse); inf when `after` is not finite."""
        if not math.isfinite(after):
            return math.inf
        worse_by = (before - after) if self.higher_is_better else (after - before)
        if self.scale == "relative" and before != 0:
            return worse_by / abs(before)
        return worse_by


@runtime_checkable
class Workload(Protocol):
    name: str
    kind: str  # "encoder" | "causal-lm" | "generic"
    model: Any  # the original, unoptimized model, in eval mode
    metric: Metric

    def run(self, model: Any, batch: Any = None) -> Any:
        """One call (no grad) on `batch` (from `timing_batch`), or on the default batch when None."""

    def evaluate(self, model: Any) -> dict[str, float]:
        """Accuracy of `model`; must contain `metric.name`, may contain more (reported, not gated)."""

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """Up to `n` inputs for passes that calibrate; never the evaluation data."""

    def extra_measurements(self, model: Any) -> dict[str, float]:
        """Measurements beyond latency (e.g. generation TTFT, tokens/s); {} when none."""

    def describe(self) -> dict[str, Any]:
        """JSON facts for the report: model id, parameter count, batch shape, eval set size."""


def timing_batch(workload: Any, index: int) -> Any:
    """The workload's index-th timing batch, or None when it has no timing stream (one batch only)."""
    make = getattr(workload, "timing_batch", None)
    return make(index) if callable(make) else None


def run_on(workload: Any, model: Any, batch: Any) -> Any:
    """`workload.run(model, batch)`, or `workload.run(model)` when there is no batch."""
    return workload.run(model) if batch is None else workload.run(model, batch)


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


def batch_digest(batch: Any) -> str:
    """A SHA-1 of every tensor's bytes, shape and dtype (and of other values' repr) inside `batch`."""
    import hashlib

    import torch

    h = hashlib.sha1()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in x:
                h.update(f"K{k!r}".encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                visit(v)
        else:
            h.update(f"V{x!r}".encode())

    visit(batch)
    return h.hexdigest()
