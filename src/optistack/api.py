"""The one-call entry points: `optimize` for any module, `list_passes` for what can run here."""
from __future__ import annotations

from typing import Any, Callable

from .core.pipeline import Pipeline
from .core.registry import get_pass_class, pass_names
from .wiring import RunResult


def optimize(model: Any, example_inputs: Any, pipeline: str | Pipeline, *,
             eval_fn: Callable[[Any], float] | None = None, higher_is_better: bool | None = None,
             metric_name: str | None = None, eval_inputs: Any = None, max_accuracy_drop: float | None = None,
             timing: Any = None, verbose: bool = True) -> RunResult:
    """Run `pipeline` on your own module; each pass is timed on `example_inputs` and scored.

    Without `eval_fn` the score is the relative output error against the unoptimized model (lower is
    better). With `eval_fn(model) -> float`, say `higher_is_better`: the direction is never guessed.
    Your `model` is left exactly as it was (weights, train/eval mode, `requires_grad`); `result.model` is
    the optimized copy (your model itself when no pass applied). Bad input (an empty pipeline, an empty
    batch, weights or inputs on the meta device) is refused before anything runs, with one error.
    """
    from .checks import ModelState, check_inputs, check_model
    from .wiring import run_pipeline
    from .workloads.generic import GenericWorkload

    def workload() -> GenericWorkload:  # built by the wiring once the pipeline, budget and timing passed
        check_model(model)
        check_inputs(example_inputs)
        for i, batch in enumerate(eval_inputs if isinstance(eval_inputs, (list, tuple)) else []):
            check_inputs(batch, f"eval_inputs[{i}]")
        return GenericWorkload(model, example_inputs, eval_fn=eval_fn, higher_is_better=higher_is_better,
                               metric_name=metric_name, eval_inputs=eval_inputs)

    with ModelState(model):  # the workload runs it in eval mode; the caller gets it back as it was
        return run_pipeline(pipeline, workload, max_accuracy_drop=max_accuracy_drop, timing=timing, verbose=verbose)


def list_passes() -> list[dict[str, Any]]:
    """Every registered pass with whether it can run here and, when not, why."""
    rows = []
    for name in pass_names():
        try:
            cls = get_pass_class(name)
            available = cls().requirements()
            rows.append({"name": name, "available": available.ok, "reason": available.reason,
                         "takes": sorted(cls.takes), "gives": cls.gives, "lossy": getattr(cls, "lossy", False),
                         "summary": _summary(cls)})
        except Exception as exc:  # a broken plugin is listed, not fatal
            rows.append({"name": name, "available": False, "reason": f"failed to load: {exc}",
                         "takes": [], "gives": None, "lossy": False, "summary": ""})
    return rows


def _summary(cls: type) -> str:
    import sys

    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    return doc.strip().split("\n")[0]
