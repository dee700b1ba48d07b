"""`lora-merge`: fold PEFT LoRA adapters into the base weights (W += B @ A * scale) and drop the adapters.

An unmerged adapter costs two extra small matmuls per adapted Linear on every call; merged, the model
is the plain base architecture again, with the same outputs up to float rounding. The baseline is the
user's unmerged `PeftModel` (give it to a workload: `LongQAWorkload(model=peft_model)`,
`GenericWorkload(peft_model, ...)`). `adapter=` picks one adapter by name (default: the active ones).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...core.config import PassConfig
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, need_packages
from .causal import refuse_unless_causal_lm


@dataclasses.dataclass(frozen=True)
class LoraMergeConfig(PassConfig):
    adapter: str = ""  # "" = the active adapter(s); otherwise the one adapter to merge (others are dropped)
    safe: bool = True  # check the merged weights are finite before keeping them (peft's safe_merge)
    causal_lm_only: bool = True  # a serving pass: refuse other workloads unless told (false: any PeftModel)


def _lora_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class LoraMergePass(ConfiguredPass):
    """PeftModel (LoRA) -> the base model with the adapter merged into its weights."""

    name = "lora-merge"
    Config = LoraMergeConfig
    takes = frozenset({MODULE})

    def requirements(self) -> Availability:
        return need_packages("peft", extra="serving")

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        from peft import PeftModel

        refuse_unless_causal_lm(self.name, ctx, self.config.causal_lm_only, model)
        if not isinstance(model, PeftModel):
            raise PassApplyError(f"lora-merge: needs a peft PeftModel with LoRA adapters, got {type(model).__name__}; "
                                 "load the adapter with peft.PeftModel.from_pretrained(base, adapter_dir) first")
        layers = _lora_layers(model)
        if not layers:
            raise PassApplyError("lora-merge: the PeftModel holds no LoRA layers (other PEFT methods are not merged here)")
        names = list(model.peft_config)
        adapter = self.config.adapter
        if adapter and adapter not in names:
            raise PassApplyError(f"lora-merge: no adapter named {adapter!r}; this model has {', '.join(names)}")
        if any(getattr(layer, "merged", False) for layer in layers):
            raise PassApplyError("lora-merge: adapters are already merged into the weights (merge_adapter was called); "
                                 "call unmerge_adapter() first or use the model as is")
        chosen = [adapter] if adapter else None
        try:
            with torch.no_grad():
                merged = model.merge_and_unload(safe_merge=self.config.safe, adapter_names=chosen)
        except ValueError as exc:  # safe_merge found non-finite weights; the copy we were given is dropped
            raise PassApplyError(f"lora-merge: {exc}") from exc
        merged.eval()
        info = {"adapters": ",".join(chosen or _active(model, names)), "lora_layers_merged": len(layers),
                "params_after": sum(p.numel() for p in merged.parameters())}
        return PassResult(merged, modified=True, info=info)


def _active(model: Any, names: list[str]) -> list[str]:
    active = getattr(model, "active_adapters", None)
    if callable(active):  # older peft: a method
        active = active()
    return list(active) if active else names
