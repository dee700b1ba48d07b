"""A transformers `TrainerCallback` that optimizes the trained model and logs the measured figures.

    from optistack.integrations.transformers import OptistackCallback

    cb = OptistackCallback("int8-dynamic", example_inputs=tokenizer(["a sample"], return_tensors="pt"))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    cb.trainer = trainer  # optional: send the figures through Trainer.log, i.e. to every reporter
    trainer.train()
    cb.report  # the optistack Report; trainer.state.log_history holds its figures

Importing this module imports transformers; `import optistack` does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from ..core.pipeline import Pipeline
from .trained_model import RunnerResults, TrainedModelOptimizer


class OptistackCallback(RunnerResults, TrainerCallback):
    """Runs an optistack pipeline on a copy of the trained model at train end (or each evaluation).

    Give `example_inputs` (a batch the model takes, e.g. a tokenizer's output) or `workload`, a
    callable `(model) -> workload` for your own scoring. The figures (speedup, accuracy delta,
    latency, size, per pass) go to the trainer's log: through `Trainer.log` when `trainer` is set,
    which reaches every reporter (TensorBoard, W&B, ...), else straight into `state.log_history`,
    because transformers does not hand callbacks the trainer.
    """

    def __init__(self, pipeline: str | Pipeline, *, example_inputs: Any = None,
                 workload: Callable[[Any], Any] | None = None, when: str = "train_end",
                 max_accuracy_drop: float | None = None, timing: Any = None,
                 save_report: str | Path | None = None, prefix: str = "optistack", verbose: bool = True,
                 trainer: Any = None) -> None:
        self.runner = TrainedModelOptimizer(
            pipeline, example_inputs=example_inputs, workload=workload, when=when,
            max_accuracy_drop=max_accuracy_drop, timing=timing, save_report=save_report, prefix=prefix,
            verbose=verbose)
        self.trainer = trainer

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.runner.when == "train_end":
            self._optimize_and_log(state, model)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.runner.when == "evaluate":
            self._optimize_and_log(state, model)

    def _optimize_and_log(self, state: Any, model: Any) -> None:
        if not state.is_world_process_zero:  # one measurement per job, not one per process
            return
        if model is None:
            raise RuntimeError("optistack callback: the trainer passed no model to the callback")
        metrics = self.runner.run(model, step=state.global_step)
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})
