"""The same callback for the older `pytorch_lightning` package, whose Trainer wants its own Callback class.

    from optistack.integrations.pytorch_lightning import OptistackCallback

Importing this module imports pytorch_lightning; `import optistack` does not.
"""
from __future__ import annotations

from pytorch_lightning import Callback

from .lightning_hooks import OptistackHooks


class OptistackCallback(OptistackHooks, Callback):
    __doc__ = OptistackHooks.__doc__
