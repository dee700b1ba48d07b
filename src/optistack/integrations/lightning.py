"""A Lightning (`import lightning`) callback that optimizes the trained model and logs the figures.

    from optistack.integrations.lightning import OptistackCallback

    cb = OptistackCallback("int8-dynamic", example_inputs=torch.randn(8, 32))
    trainer = lightning.Trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(module, train_loader)
    cb.report  # the optistack Report; every trainer logger got its figures

Importing this module imports lightning; `import optistack` does not.
"""
from __future__ import annotations

from lightning.pytorch import Callback

from .lightning_hooks import OptistackHooks


class OptistackCallback(OptistackHooks, Callback):
    __doc__ = OptistackHooks.__doc__
