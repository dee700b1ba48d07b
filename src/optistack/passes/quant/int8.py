"""`int8-dynamic` and `int8-weight`: torchao int8 quantization of linear layers.

- `int8-dynamic` (`Int8DynamicActivationInt8WeightConfig`): weights int8 per output channel,
  activations quantized to int8 per token at run time; the matmul runs in int8. On CPU this is only
  fast after `compile` (MiniLM: ~1.0x eager, ~2.2x with `int8-dynamic,compile`; cosine ~0.997).
- `int8-weight` (`Int8WeightOnlyConfig`): weights stored int8 per output channel and dequantized in
  the matmul; activations stay float. Quarters Linear weight memory; small speedup on CPU (~1.07x).

Both swap the Linear weights for torchao tensor subclasses in place (the module tree is unchanged,
except that transformers Conv1D layers, GPT-2's, first become the equivalent nn.Linear). Layers are
picked by `passes/linears.py`: `skip` (a regex searched in module names) and `min_features` leave
layers in float, and so does a weight tied to a module the pass does not rewrite (GPT-2's lm_head and
its embedding): quantizing one user of it would store a second copy and grow the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ...core.config import PassConfig, check, check_regex
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.quiet import quiet_import
from ...core.requirements import Availability, need_packages
from ..linears import as_linear, is_conv1d, plan_linears, set_module


def _torchao() -> Any:
    with quiet_import():
        import torchao.quantization as tq
        import torchao.utils
    return tq, torchao.utils


@dataclasses.dataclass(frozen=True)
class Int8Config(PassConfig):
    skip: str = ""
    min_features: int = 16

    def __post_init__(self) -> None:
        check_regex("", "skip", self.skip)  # shared by int8-dynamic and int8-weight
        check(self.min_features >= 1, f"option 'min_features' must be >= 1; got {self.min_features}")


def _tune_inductor(device: Any) -> bool:
    """Let torchao set its recommended (process-wide) torch._inductor.config values on CUDA only.

    They tune Triton kernels and fuse CUDA int_mm with mul; on CPU none of them applies, so there
    the pass leaves global inductor settings untouched.
    """
    return device.type == "cuda"


class _Int8Pass(ConfiguredPass):
    Config = Int8Config
    takes = frozenset({MODULE})
    lossy = True

    def requirements(self) -> Availability:
        return need_packages("torchao", extra="quant")

    def _ao_config(self, tq: Any, ao_utils: Any, device: Any) -> Any:
        raise NotImplementedError

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        plan = plan_linears(model, self.name, self.config.skip, self.config.min_features)
        done = len(plan.chosen) + len(plan.aliases)
        info: dict[str, Any] = {"linears_quantized": done, "linears_skipped": len(plan.layers) - done}
        if not plan.chosen:
            return plan.unchanged(model, info)
        info.update(plan.info())
        tq, ao_utils = _torchao()
        modules = {}
        for name in plan.chosen:  # Conv1D -> nn.Linear (torchao quantizes nn.Linear weights)
            m = plan.layers[name]
            if is_conv1d(m):
                m = as_linear(m)
                set_module(model, name, m)
            modules[name] = m
        for alias, primary in plan.aliases.items():  # one module, so one quantized weight, for all users
            set_module(model, alias, modules[primary])
        device = modules[plan.chosen[0]].weight.device
        chosen = {id(m) for m in modules.values()}

        def filter_fn(m: torch.nn.Module, fqn: str) -> bool:
            return id(m) in chosen

        with quiet_import():
            tq.quantize_(model, self._ao_config(tq, ao_utils, device), filter_fn=filter_fn)
        return PassResult(model, modified=True, info=info)


class Int8DynamicPass(_Int8Pass):
    """int8 weights + per-token dynamic int8 activations (torchao); pair with `compile` on CPU."""

    name = "int8-dynamic"

    def _ao_config(self, tq: Any, ao_utils: Any, device: Any) -> Any:
        # CPUs without VNNI can overflow int8 products in the u8s8 path: torchao asks to reduce range.
        return tq.Int8DynamicActivationInt8WeightConfig(
            reduce_range=ao_utils.should_reduce_range(device), set_inductor_config=_tune_inductor(device)
        )


class Int8WeightPass(_Int8Pass):
    """int8 per-channel weights, float activations (torchao weight-only)."""

    name = "int8-weight"

    def _ao_config(self, tq: Any, ao_utils: Any, device: Any) -> Any:
        return tq.Int8WeightOnlyConfig(set_inductor_config=_tune_inductor(device))
