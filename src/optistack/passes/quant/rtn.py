"""`rtn-int4`: round-to-nearest group-wise int4 weights on linear layers (weight-only, lossy).

Every chosen Linear becomes an `Int4Linear` (see `int4.py`): 4-bit codes per group of `group_size`
input channels, a scale and an offset per group, run by torch's int4 kernels (bf16 activations on
CPU). No calibration data. `awq` reuses this module's config fields and layer swapping.

in_features that `group_size` does not divide (SmolLM2's 576 with 128) are padded to the next
multiple (counted in `layers_padded`); layers no kernel can take run dequantize-then-matmul
(counted in `layers_fallback`, with the reason). Layers are picked by `passes/linears.py`: nn.Linear
and transformers Conv1D (GPT-2), tied weights left as they are with the reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ...core.config import PassConfig, check, check_regex
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..linears import plan_linears, set_module, weight_rows

GROUP_SIZES = (32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Int4Config(PassConfig):
    group_size: int = 64
    zero_point: bool = True
    skip: str = "lm_head"
    head: Literal["int8", "int4", "keep"] = "keep"  # a head that `skip` skipped: see head.py
    # integer: whole-step zero points, the form compressed-tensors/vLLM store (save_pretrained is exact);
    # float: the group's own offset, lower error, kept by optistack's own save only (see int4.py)
    zero_grid: Literal["integer", "float"] = "integer"

    @property
    def zero_mode(self) -> bool | str:
        """What int4.quantize/qparams take as `zero_point`: False, True (integer grid) or "float"."""
        return "float" if self.zero_point and self.zero_grid == "float" else self.zero_point  # int4.FLOAT_ZERO

    def __post_init__(self) -> None:
        check(self.group_size in GROUP_SIZES, f"option 'group_size' must be one of "
              f"{', '.join(map(str, GROUP_SIZES))} (the group sizes torch's int4 kernels take); got {self.group_size}")
        check_regex("", "skip", self.skip)  # shared by rtn-int4 and awq


class Int4Tally:
    """Counts what the swaps did, for `PassResult.info`."""

    def __init__(self, group_size: int, zero_point: bool) -> None:
        self.group_size, self.zero_point = group_size, zero_point
        self.quantized = self.padded = self.weights = self.bytes = 0
        self.kernels: dict[str, int] = {}
        self.fallback_reasons: list[str] = []

    def add(self, name: str, layer: Any, reason: str | None) -> None:
        self.quantized += 1
        self.padded += layer.padded_in_features != layer.in_features
        self.kernels[layer.kernel] = self.kernels.get(layer.kernel, 0) + 1
        if reason:
            self.fallback_reasons.append(f"{name}: {reason}")
        self.weights += layer.in_features * layer.out_features
        self.bytes += sum(t.numel() * t.element_size() for n, t in layer.named_buffers() if n != "bias")

    def info(self, skipped: int) -> dict[str, Any]:
        from ...layers.int4 import DEQUANT

        out: dict[str, Any] = {
            "layers_quantized": self.quantized,
            "layers_skipped": skipped,
            "layers_padded": self.padded,
            "layers_fallback": self.kernels.get(DEQUANT, 0),
            "kernel": "+".join(sorted(self.kernels)) or "none",
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "bits_per_weight": round(8 * self.bytes / self.weights, 3) if self.weights else 0.0,
        }
        if self.fallback_reasons:
            out["fallback_reason"] = "; ".join(self.fallback_reasons[:3]) + (
                f" (+{len(self.fallback_reasons) - 3} more)" if len(self.fallback_reasons) > 3 else "")
        return out


def swap_to_int4(model: Any, name: str, linear: Any, tally: Int4Tally,
                 wmin: Any = None, wmax: Any = None, label: str | None = None) -> Any:
    """Replace `model.<name>` (an nn.Linear or Conv1D) by an Int4Linear; `wmin`/`wmax` clip its groups'
    ranges. `label` names the layer in reports (default `name`)."""
    from ...layers.int4 import Int4Linear, choose_kernel, param_dtype_for
    from ...layers.int4_grid import quantize

    w = weight_rows(linear).detach()
    kernel, reason = choose_kernel(w.device, w.shape[0], w.shape[1], tally.group_size)
    gq = quantize(w, tally.group_size, tally.zero_point, param_dtype_for(kernel), wmin, wmax)
    layer = Int4Linear.from_quantized(gq, linear.bias, kernel, w.device)
    layer.weight_dtype = w.dtype
    set_module(model, name, layer)
    tally.add(label or name, layer, reason)
    return layer


class RtnInt4Pass(ConfiguredPass):
    """Round-to-nearest group-wise int4 weights on torch's int4 kernels."""

    name = "rtn-int4"
    Config = Int4Config
    takes = frozenset({MODULE})
    lossy = True
    copy_on_write = True  # swaps in new layers, never writes into its input's tensors

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        from .head import quantize_head

        plan = plan_linears(model, self.name, self.config.skip)
        tally = Int4Tally(self.config.group_size, self.config.zero_mode)
        if not plan.chosen:
            return plan.unchanged(model, tally.info(len(plan.skipped)))
        planned = plan.info()
        with torch.no_grad():
            for name in plan.chosen:  # the plan lets go of each float layer once swapped: in place, it is freed
                layer = swap_to_int4(model, name, plan.layers.pop(name), tally)
                for alias in (a for a, p in plan.aliases.items() if p == name):
                    set_module(model, alias, layer)
            head = quantize_head(model, self.config.head, lambda n, lin: swap_to_int4(model, n, lin, tally),
                                 plan.skipped)
        return PassResult(model, modified=True, info={**tally.info(len(plan.skipped)), **planned, **head})
