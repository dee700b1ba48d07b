"""The Lightning callback's hooks, free of any Lightning import, so `lightning` and the older
`pytorch_lightning` package each get a callback class from the same code."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..core.pipeline import Pipeline
from .trained_model import RunnerResults, TrainedModelOptimizer


class OptistackHooks(RunnerResults):
    """Runs an optistack pipeline on a copy of the trained LightningModule at train end (or after each
    validation) and sends the figures to every logger of the trainer with `log_metrics`.

    Give `example_inputs` (what `module(...)` takes) or `workload`, a callable `(module) -> workload`,
    e.g. `lambda m: GenericWorkload(m.net, x)` to optimize an inner network. `pl_module.log` is not
    used: Lightning forbids it in `on_train_end`, and these figures are not per-batch values.
    """

    def __init__(self, pipeline: str | Pipeline, *, example_inputs: Any = None,
                 workload: Callable[[Any], Any] | None = None, when: str = "train_end",
                 max_accuracy_drop: float | None = None, timing: Any = None,
                 save_report: str | Path | None = None, prefix: str = "optistack", verbose: bool = True) -> None:
        super().__init__()
        self.runner = TrainedModelOptimizer(
            pipeline, example_inputs=example_inputs, workload=workload, when=when,
            max_accuracy_drop=max_accuracy_drop, timing=timing, save_report=save_report, prefix=prefix,
            verbose=verbose)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.runner.when == "train_end":
            self._optimize_and_log(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.runner.when == "evaluate" and not trainer.sanity_checking:
            self._optimize_and_log(trainer, pl_module)

    def _optimize_and_log(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:  # one measurement per job, not one per process
            return
        metrics = self.runner.run(pl_module, step=trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
