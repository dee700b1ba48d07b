"""Any callable model with example inputs: the user's own use case without writing a workload class.

Scored either by the user's `eval_fn` (whose direction must be stated: we never guess whether higher
is better) or, by default, by relative output error against the original model's outputs.

Timed on batches derived from the example inputs by `base.vary_inputs` (rows permuted, 1% noise on
float tensors, token-id-like integer tensors partly resampled from their own values), never on the
example or eval inputs themselves, which are what gets scored. The first derived batch is tried on the
model when the workload is built: if resampled integers break it (sorted offsets, say), integers are
kept as they are; if no derived batch works or differs, timing falls back to the example inputs and
`describe()["timing"]` says so.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from ..core.errors import WorkloadError

# normalize_inputs and flatten_outputs moved to core.modeling (passes use them too); re-exported here
from ..core.modeling import Inputs, flatten_outputs, model_device, normalize_inputs, to_device  # noqa: F401
from ..core.workload import Metric, batch_digest
from .base import vary_inputs


class GenericWorkload:
    """Wraps a model and its example inputs; see the module docstring for how it is scored."""

    kind = "generic"

    def __init__(
        self,
        model: Any,
        example_inputs: Any,
        eval_fn: Callable[[Any], float] | None = None,
        higher_is_better: bool | None = None,
        metric_name: str | None = None,
        eval_inputs: Iterable[Any] | None = None,
        name: str = "generic",
    ) -> None:
        if not callable(model):
            raise WorkloadError(f"generic: the model must be callable, got a {type(model).__name__}")
        if eval_fn is not None and not callable(eval_fn):
            raise WorkloadError(f"generic: eval_fn must be callable, got a {type(eval_fn).__name__}")
        if eval_fn is not None and not isinstance(higher_is_better, bool):
            raise WorkloadError(
                "generic: with eval_fn, pass higher_is_better=True or False; the accuracy gate needs the "
                "metric's direction and optistack never guesses it"
            )
        self.name = name
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        self.eval_fn = eval_fn
        self.inputs = normalize_inputs(example_inputs)
        if eval_inputs is not None and not isinstance(eval_inputs, (list, tuple)):
            raise WorkloadError("generic: eval_inputs must be a list of inputs (each in any form example_inputs accepts)")
        self.eval_inputs = [normalize_inputs(x) for x in (eval_inputs or [])]
        self._inputs_on: dict[str, Inputs] = {}
        if eval_fn is not None:
            self.metric = Metric(metric_name or "eval", higher_is_better, "relative")
        else:
            self.metric = Metric("rel_error", False, "absolute")
        # Run the original once now: this checks the inputs fit the model, and the outputs are the
        # reference, taken before any pass can change the model in place.
        self._reference = [self._call(self.model, inp, check=True) for inp in self._all_inputs()]
        self._scored = {batch_digest(inp) for inp in self._all_inputs()}
        self.timing_rule = self._choose_timing_rule()

    def _choose_timing_rule(self) -> str:
        """"resample" (ints partly resampled), "keep-ints", or "example" (no derived batch works)."""
        ref = self._reference[0]
        for rule in ("resample", "keep-ints"):
            batch = vary_inputs(self.inputs, 0, resample_ints=rule == "resample")
            if batch_digest(batch) in self._scored:
                continue  # nothing to vary under this rule (a single row of masks, say)
            try:
                out = self._call(self.model, batch)
            except Exception:
                continue
            if out.shape == ref.shape and (bool(torch.isfinite(out).all()) or not bool(torch.isfinite(ref).all())):
                return rule
        return "example"

    def timing_batch(self, index: int) -> Inputs | None:
        """The index-th derived batch (never one that is scored); None when timing uses the example."""
        if self.timing_rule == "example":
            return None
        for attempt in range(8):
            batch = vary_inputs(self.inputs, index + attempt * 1_000_003, resample_ints=self.timing_rule == "resample")
            if batch_digest(batch) not in self._scored:
                return batch
        return None

    def _all_inputs(self) -> list[Inputs]:
        return [self.inputs, *self.eval_inputs]

    def _call(self, model: Any, inputs: Inputs, check: bool = False) -> torch.Tensor:
        args, kwargs = to_device(inputs, model_device(model))
        try:
            with torch.inference_mode():
                out = model(*args, **kwargs)
        except Exception as exc:
            if not check:
                raise
            raise WorkloadError(
                f"generic: running the model on its example inputs failed: {type(exc).__name__}: {exc}"
            ) from exc
        return flatten_outputs(out)

    def run(self, model: Any, batch: Inputs | None = None) -> Any:
        """model(*args, **kwargs) on `batch` (a timing batch), or on the example inputs when None; no grad."""
        device = model_device(model)
        if batch is not None:
            args, kwargs = to_device(batch, device)
        else:
            inputs = self._inputs_on.get(str(device))
            if inputs is None:
                inputs = self._inputs_on[str(device)] = to_device(self.inputs, device)
            args, kwargs = inputs
        with torch.inference_mode():
            return model(*args, **kwargs)

    def _user_score(self, model: Any) -> float:
        """The caller's eval_fn, as a float; one WorkloadError naming eval_fn when it raises or returns
        something that is not a number (a failing metric is the metric's fault, not the pass's)."""
        try:
            value = self.eval_fn(model)
        except Exception as exc:
            raise WorkloadError(f"generic: eval_fn raised {type(exc).__name__}: {exc}") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                isinstance(value, torch.Tensor) and value.numel() == 1):
            raise WorkloadError(f"generic: eval_fn must return a number (higher_is_better says which way is "
                                f"better); it returned a {type(value).__name__}: {str(value)[:80]!r}")
        return float(value)

    def evaluate(self, model: Any) -> dict[str, float]:
        if self.eval_fn is not None:
            return {self.metric.name: self._user_score(model)}
        diff_sq, ref_sq, worst = 0.0, 0.0, 0.0
        for inputs, ref in zip(self._all_inputs(), self._reference):
            out = self._call(model, inputs)
            if out.shape != ref.shape:
                raise WorkloadError(f"generic: outputs have {out.numel()} values, the original model gave {ref.numel()}")
            if not torch.isfinite(out).all():
                return {self.metric.name: math.nan, f"{self.metric.name}_max": math.nan}
            d, r = (out - ref).square().sum().item(), ref.square().sum().item()
            diff_sq, ref_sq = diff_sq + d, ref_sq + r
            worst = max(worst, _ratio(d, r))
        return {self.metric.name: _ratio(diff_sq, ref_sq), f"{self.metric.name}_max": worst}

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """The example inputs (and eval inputs): a generic workload has no other data."""
        return self._all_inputs()[: max(n, 0)]

    def extra_measurements(self, model: Any) -> dict[str, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        model = self.model
        params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else None
        return {
            "model": type(model).__name__,
            "params": params,
            "input_shapes": _shapes(self.inputs),
            "eval_inputs": len(self._all_inputs()),
            "metric": self.metric.name,
            "timing": {"resample": "batches derived from the example inputs (ints resampled)",
                       "keep-ints": "batches derived from the example inputs (ints kept)",
                       "example": "the example inputs only (no distinct batch could be derived)"}[self.timing_rule],
        }


def _ratio(diff_sq: float, ref_sq: float) -> float:
    """‖y - y_ref‖ / ‖y_ref‖, falling back to the absolute error when the reference is all zeros."""
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)


def _shapes(inputs: Inputs) -> Any:
    args, kwargs = inputs
    shape = lambda x: list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
    return {"args": [shape(a) for a in args], "kwargs": {k: shape(v) for k, v in kwargs.items()}}
