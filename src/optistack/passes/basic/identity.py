"""`identity`: returns the model unchanged, to validate the instrument (its speedup CI must hold 1.0)."""
from __future__ import annotations

from typing import Any

from ...core.pass_protocol import COMPILED, ENGINE, MODULE, ONNX, ConfiguredPass, PassContext, PassResult


class IdentityPass(ConfiguredPass):
    name = "identity"
    takes = frozenset({MODULE, COMPILED, ONNX, ENGINE})
    measure_unmodified = True  # a control: measured (and applied) although it changes nothing
    copy_on_write = True  # changes nothing

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        return PassResult(model, modified=False)
