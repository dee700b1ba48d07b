"""The serving passes' workload check: they are built and measured for causal LMs, so other workloads
are refused with the reason (and the option that lifts it, where the technique also works elsewhere)."""
from __future__ import annotations

from typing import Any

from ...core.errors import PassApplyError
from ...core.pass_protocol import PassContext


def looks_causal_lm(model: Any) -> bool:
    """A transformers *ForCausalLM (also behind a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any("CausalLM" in type(m).__name__ for m in (model, base))


def refuse_unless_causal_lm(pass_name: str, ctx: PassContext, causal_lm_only: bool, model: Any) -> None:
    """A causal-lm workload passes; a generic one passes when its model is a causal LM; others are refused."""
    if not causal_lm_only or ctx.workload is None:
        return
    kind = getattr(ctx.workload, "kind", None)
    if kind == "causal-lm" or (kind in (None, "generic") and looks_causal_lm(model)):
        return
    raise PassApplyError(
        f"{pass_name}: a serving pass for causal LMs; workload {getattr(ctx.workload, 'name', '?')!r} is "
        f"{kind!r} with a {type(model).__name__}. Set {pass_name}{{causal_lm_only=false}} to apply it to "
        "other transformers models anyway")
