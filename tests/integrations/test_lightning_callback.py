"""A tiny Lightning fit with the callback: the report exists at train end (or after each validation)
and its figures reach the trainer's loggers."""
from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import Logger  # noqa: E402

from optistack.bench.timer import TimingConfig  # noqa: E402
from optistack.integrations.lightning import OptistackCallback  # noqa: E402

FAST = TimingConfig(warmup=1, min_rounds=3, max_rounds=3, max_seconds=1.0)


class TinyRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MemoryLogger(Logger):
    """Keeps every log_metrics call, so the test can see what a real logger would have written."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def loader(n: int = 32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def fit(trainer_module, callback, logger, **kwargs):
    trainer = trainer_module.Trainer(max_steps=4, logger=logger, callbacks=[callback], accelerator="cpu",
                                     enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, **kwargs)
    module = TinyRegressor()
    trainer.fit(module, loader(), loader(16))
    return trainer, module


def optistack_calls(logger: MemoryLogger) -> list[tuple[int | None, dict]]:
    return [(step, m) for step, m in logger.calls if "optistack/speedup" in m]


def test_train_end_figures_reach_the_logger(tmp_path):
    cb = OptistackCallback("int8-dynamic", example_inputs=torch.randn(8, 16), timing=FAST, verbose=False,
                           save_report=tmp_path / "report.json")
    logger = MemoryLogger()
    trainer, module = fit(L, cb, logger)

    assert cb.report is not None and [s.status for s in cb.report.steps] == ["applied"]
    assert cb.result.model is not module
    ((step, metrics),) = optistack_calls(logger)
    assert step == trainer.global_step == 4
    assert metrics["optistack/speedup"] == cb.report.final_speedup
    assert metrics["optistack/model_bytes"] < metrics["optistack/baseline_model_bytes"]
    for key in ("accuracy_delta", "latency_ms", "1-int8-dynamic/applied", "1-int8-dynamic/speedup"):
        assert f"optistack/{key}" in metrics
    assert (tmp_path / "report.json").is_file()


def test_each_validation_runs_the_pipeline_but_not_the_sanity_check():
    cb = OptistackCallback("identity", workload=lambda m: _inner_workload(m), when="evaluate", timing=FAST,
                           verbose=False)
    logger = MemoryLogger()
    fit(L, cb, logger, val_check_interval=2, num_sanity_val_steps=1)

    assert [step for step, _ in cb.history] == [2, 4]
    assert [step for step, _ in optistack_calls(logger)] == [2, 4]
    assert cb.report.workload["model"] == "Sequential"  # the factory chose the inner network


def _inner_workload(module):
    from optistack.workloads.generic import GenericWorkload

    return GenericWorkload(module.net, torch.randn(4, 16))


def test_the_pytorch_lightning_package_gets_its_own_callback_class():
    pl = pytest.importorskip("pytorch_lightning")
    from optistack.integrations.pytorch_lightning import OptistackCallback as PlCallback

    cb = PlCallback("int8-dynamic", example_inputs=torch.randn(8, 16), timing=FAST, verbose=False)
    assert isinstance(cb, pl.Callback)

    class PlRegressor(pl.LightningModule):
        training_step, configure_optimizers, forward = (TinyRegressor.training_step,
                                                        TinyRegressor.configure_optimizers, TinyRegressor.forward)

        def __init__(self) -> None:
            super().__init__()
            self.net = TinyRegressor().net

    class PlMemoryLogger(pl.loggers.Logger):
        name, version = "memory", 0
        log_hyperparams = MemoryLogger.log_hyperparams

        def __init__(self) -> None:
            super().__init__()
            self.calls = []

        def log_metrics(self, metrics, step=None) -> None:
            self.calls.append((step, dict(metrics)))

    logger = PlMemoryLogger()
    trainer = pl.Trainer(max_steps=2, logger=logger, callbacks=[cb], accelerator="cpu", enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(PlRegressor(), loader())
    assert cb.report is not None
    assert [step for step, m in logger.calls if "optistack/speedup" in m] == [2]
