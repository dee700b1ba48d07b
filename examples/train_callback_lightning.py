"""Train with Lightning and let optistack optimize the trained module at the end; the figures go to
the trainer's loggers (here a CSVLogger: out/lightning/optistack/version_0/metrics.csv).

    python examples/train_callback_lightning.py     # under a minute on 2 CPU cores
"""
import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

import optistack as ost
from optistack.integrations.lightning import OptistackCallback
from optistack.workloads.generic import GenericWorkload


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                       torch.nn.GELU(), torch.nn.Linear(512, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


torch.manual_seed(0)
x = torch.randn(2048, 64)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :8].sum(1, keepdim=True)), batch_size=64)
held_out = torch.randn(128, 64)


def mse_on_held_out(model) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(held_out), held_out[:, :8].sum(1, keepdim=True)))


callback = OptistackCallback(
    "prune-magnitude{sparsity=0.3},int8-dynamic",
    # a workload factory: score on the task's own metric (lower MSE is better) instead of output error
    workload=lambda module: GenericWorkload(module.net, held_out[:32], eval_fn=mse_on_held_out,
                                            higher_is_better=False, metric_name="mse"),
    max_accuracy_drop=0.10,  # reject a pass that makes the held-out MSE more than 10% worse
    timing=ost.TimingConfig(warmup=2, min_rounds=5, max_rounds=20, max_seconds=5.0),
)
trainer = L.Trainer(max_epochs=3, logger=CSVLogger("out/lightning", name="optistack"), callbacks=[callback],
                    accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(Regressor(), data)

callback.report.print()
print("metrics written to", trainer.logger.log_dir)
