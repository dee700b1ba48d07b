"""What every training callback shares: run a pipeline on a copy of the model being trained, keep the
report, and flatten it into numbers a training logger can plot.

The callbacks only decide *when* (train end or each evaluation) and *where the numbers go* (the
trainer's own loggers); everything measured comes from the usual pipeline run and its report.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import OptistackError
from ..core.pipeline import Pipeline

WHEN = ("train_end", "evaluate")


class TrainedModelOptimizer:
    """Runs `pipeline` on a trained model; built from example inputs or a `(model) -> workload` factory.

    The model handed in is never changed (not even its train/eval mode): the pipeline runs on a
    detached copy, so a run at each evaluation leaves training exactly as it was.
    """

    def __init__(self, pipeline: str | Pipeline, *, example_inputs: Any = None,
                 workload: Callable[[Any], Any] | None = None, when: str = "train_end",
                 max_accuracy_drop: float | None = None, timing: Any = None,
                 save_report: str | Path | None = None, prefix: str = "optistack", verbose: bool = True) -> None:
        if (example_inputs is None) == (workload is None):
            raise OptistackError(
                "optistack callback: pass exactly one of example_inputs=... (the model is timed and scored "
                "on them) or workload=<callable (model) -> workload>; got "
                + ("both" if workload is not None else "neither"))
        if workload is not None and not callable(workload):
            raise OptistackError(f"optistack callback: workload must be a callable (model) -> workload, "
                                 f"got a {type(workload).__name__}")
        if when not in WHEN:
            raise OptistackError(f"optistack callback: when must be one of {', '.join(map(repr, WHEN))}; got {when!r}")
        if not isinstance(prefix, str) or not prefix:
            raise OptistackError(f"optistack callback: prefix must be a non-empty string; got {prefix!r}")
        # Parse now: a typo in the pipeline fails before training starts, not after it ends.
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
        self.example_inputs = example_inputs
        self.workload_factory = workload
        self.when = when
        self.max_accuracy_drop = max_accuracy_drop
        self.timing = timing
        self.save_report = save_report
        self.prefix = prefix
        self.verbose = verbose
        self.result: Any = None  # the latest RunResult (its .model is the optimized copy)
        self.history: list[tuple[int, Any]] = []  # (training step, Report) for every run

    @property
    def report(self) -> Any:
        """The latest report, or None before the first run."""
        return self.result.report if self.result is not None else None

    def build_workload(self, model: Any) -> Any:
        if self.workload_factory is not None:
            return self.workload_factory(model)
        from ..workloads.generic import GenericWorkload

        inputs = self.example_inputs
        if isinstance(inputs, Mapping) and not isinstance(inputs, dict):
            inputs = dict(inputs)  # a tokenizer's BatchEncoding is a Mapping, not a dict: keyword arguments
        return GenericWorkload(model, inputs)

    def run(self, model: Any, step: int) -> dict[str, float]:
        """Optimize a copy of `model`, keep the report, save it if asked; returns the figures to log."""
        # Lightning calls validation hooks under inference_mode; a copy made there would hold
        # inference tensors that some passes (and later use of result.model) cannot work with.
        with torch.inference_mode(False):
            candidate = detached_copy(model)
            result = self.pipeline.run(self.build_workload(candidate), max_accuracy_drop=self.max_accuracy_drop,
                                       timing=self.timing, verbose=self.verbose)
        self.result = result
        self.history.append((step, result.report))
        if self.save_report is not None:
            result.report.save(str(self.save_report).replace("{step}", str(step)))
        return report_metrics(result.report, self.prefix)


def detached_copy(model: Any) -> Any:
    """A copy in eval mode without gradients: the trained model keeps its mode, grads and weights."""
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:
        raise OptistackError(f"optistack callback: cannot copy the trained model to optimize it: {exc}") from exc
    if isinstance(clone, torch.nn.Module):
        clone.eval()
        for p in clone.parameters():
            p.grad = None
            p.requires_grad_(False)
    return clone


def report_metrics(report: Any, prefix: str = "optistack") -> dict[str, float]:
    """The report as flat, finite numbers: the end result, then `<prefix>/<i>-<pass>/...` for each step.

    Keys: speedup, latency_ms, baseline_latency_ms, model_bytes, baseline_model_bytes, accuracy,
    baseline_accuracy, accuracy_delta (after - before, in the metric's own units), passes_applied;
    per step: applied (1/0), speedup, cumulative_speedup, latency_ms, model_bytes, accuracy_delta.
    Missing or non-finite values are left out, since most loggers reject them.
    """
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)

    base = report.baseline or {}
    base_latency = (base.get("latency_ms") or {}).get("median")
    base_acc = base.get("accuracy") or {}
    base_score = base_acc.get(base_acc.get("metric"))
    applied = [s for s in report.steps if s.status == "applied"]
    last_timed = next((s for s in reversed(applied) if s.latency_ms), None)
    last_sized = next((s for s in reversed(applied) if s.model_bytes is not None), None)
    last_scored = next((s for s in reversed(applied) if s.accuracy is not None), None)
    final_score = last_scored.accuracy.after if last_scored is not None else base_score

    put("speedup", report.final_speedup)
    put("latency_ms", last_timed.latency_ms.get("median") if last_timed else base_latency)
    put("baseline_latency_ms", base_latency)
    put("model_bytes", last_sized.model_bytes if last_sized else base.get("model_bytes"))
    put("baseline_model_bytes", base.get("model_bytes"))
    put("accuracy", final_score)
    put("baseline_accuracy", base_score)
    if isinstance(final_score, (int, float)) and isinstance(base_score, (int, float)):
        put("accuracy_delta", final_score - base_score)
    put("passes_applied", len(applied))

    for i, step in enumerate(report.steps, 1):
        key = f"{i}-{step.pass_name}"
        put(f"{key}/applied", 1.0 if step.status == "applied" else 0.0)
        put(f"{key}/speedup", (step.speedup or {}).get("median"))
        put(f"{key}/cumulative_speedup", step.cumulative_speedup)
        put(f"{key}/latency_ms", (step.latency_ms or {}).get("median"))
        put(f"{key}/model_bytes", step.model_bytes)
        if step.accuracy is not None:
            put(f"{key}/accuracy_delta", step.accuracy.delta)
    return out


class RunnerResults:
    """What both framework callbacks expose from their `runner` (a TrainedModelOptimizer)."""

    runner: TrainedModelOptimizer

    @property
    def report(self) -> Any:
        """The latest optistack Report (None before the first run)."""
        return self.runner.report

    @property
    def result(self) -> Any:
        """The latest RunResult: `.model` is the optimized copy, `.report` its report."""
        return self.runner.result

    @property
    def history(self) -> list[tuple[int, Any]]:
        """(global step, Report) for every run, oldest first."""
        return self.runner.history
