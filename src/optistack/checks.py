"""Checks the one entry path (`wiring.run_pipeline`, which `optistack run`, `optimize()` and `Pipeline.run`
take) makes before anything runs, and the caller's model kept as it was.

Each bad input gets one `OptistackError` naming what is wrong and what would be valid: an empty
pipeline (`PipelineParseError`), a model or inputs on the meta device (no data to run), an empty batch,
a timing of the wrong type, an original model whose outputs are already NaN/inf. The budget's check is
the gate's (`bench.gate.check_budget`, a `BudgetError`). `ModelState` records
what a run may flip on the caller's model (train/eval mode of every submodule, `requires_grad` of every
parameter) and puts it back, whatever happens.
"""
from __future__ import annotations

from typing import Any, Iterator

from .core.errors import OptistackError, PipelineParseError

PIPELINE_EXAMPLE = '"int8-dynamic,compile" (see `optistack passes`)'


def check_pipeline_text(text: Any) -> None:
    """Refuse pipeline text that names no pass (empty or only whitespace)."""
    if isinstance(text, str) and not text.strip():
        raise PipelineParseError(f"the pipeline is empty: name at least one pass, e.g. {PIPELINE_EXAMPLE}")


def check_pipeline(pipeline: Any) -> None:
    """Refuse a pipeline object with no passes."""
    if len(getattr(pipeline, "passes", ())) == 0:
        raise PipelineParseError(f"the pipeline has no passes: name at least one, e.g. {PIPELINE_EXAMPLE}")


def check_timing(timing: Any) -> None:
    """None (the defaults) or an `optistack.TimingConfig`."""
    from .bench.timer import TimingConfig

    if timing is not None and not isinstance(timing, TimingConfig):
        raise OptistackError(f"timing must be an optistack.TimingConfig (e.g. TimingConfig(min_rounds=5)) or None; "
                             f"got {type(timing).__name__}")


def check_original_finite(workload: Any) -> None:
    """Refuse a run whose original model already gives NaN/inf: no pass could be compared with it."""
    from .bench.gate import all_finite

    if not all_finite(workload.run(workload.model)):
        raise OptistackError(f"the original model's outputs on the {workload.name} workload's inputs are not finite "
                             "(NaN or inf), so no pass could be compared with it; check the model's weights and "
                             "the inputs (e.g. torch.isfinite(x).all())")


def _tensors(obj: Any, depth: int = 0) -> Iterator[Any]:
    import torch

    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)


def check_model(model: Any) -> None:
    """Refuse a model whose weights are on the meta device: it has shapes but no values to run."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return
    meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        more = f" and {len(meta) - 1} more" if len(meta) > 1 else ""
        raise OptistackError(
            f"the model has weights on the meta device ('{meta[0]}'{more}): they hold no values to run; "
            "load real weights first (e.g. from_pretrained without device_map='meta', or "
            "model.to_empty(device='cpu') followed by loading a state dict)")


def check_inputs(example_inputs: Any, what: str = "example_inputs") -> None:
    """Refuse inputs that are missing, hold no tensor rows, or sit on the meta device."""
    if example_inputs is None:
        raise OptistackError(f"{what} is None: pass one batch the model is called with (a tensor, a tuple of "
                             "positional arguments, or a dict of keyword arguments)")
    if isinstance(example_inputs, (tuple, list, dict)) and len(example_inputs) == 0:
        raise OptistackError(f"{what} is empty ({type(example_inputs).__name__} of length 0): pass one batch the "
                             "model is called with, e.g. torch.randn(8, 128)")
    for t in _tensors(example_inputs):
        if t.is_meta:
            raise OptistackError(f"{what} holds a tensor on the meta device (shape {tuple(t.shape)}): it has no "
                                 "values to run the model on; pass real data (e.g. torch.randn(...))")
        if t.numel() == 0 or (t.dim() > 0 and t.shape[0] == 0):
            raise OptistackError(f"{what} holds an empty tensor (shape {tuple(t.shape)}): a batch needs at least "
                                 "one row with data to time and score the model on")


class ModelState:
    """Train/eval mode of every submodule and `requires_grad` of every parameter, restorable."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model if isinstance(model, torch.nn.Module) else None
        if self.model is None:
            self.modes, self.grads = [], []
            return
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]

    def restore(self) -> None:
        for module, training in self.modes:
            module.training = training  # not .train(): that would also set the children
        for param, flag in self.grads:
            if param.requires_grad != flag:
                param.requires_grad_(flag)

    def __enter__(self) -> "ModelState":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
