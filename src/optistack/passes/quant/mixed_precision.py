"""`mixed-precision`: a precision per linear layer (int4 at a group size, int8, or float) so the model's
average stored bits per weight stays within `bits`, spent where the calibration loss cares most.

1. Probe (`mixed_precision_probe.py`): one forward and backward of the float model on the calibration
   windows gives, per layer, the mean squared gradient of the next-token loss at each output channel;
   one forward finds the layers that read the same input (q/k/v, gate/up), which take one choice
   together with `tie=true` (so `fuse-kernels` fuses gate/up, and the engine stacks like with like).
2. Measure: block by block, as `gptq` calibrates (`gptq_blocks.calibrate_and_round`, the blocks left float),
   H = X^T X / n of each layer's inputs, and for every choice the predicted rise of the loss
   (`mixed_precision_select.py`: 1/2 sum_i f_i d_i^T H d_i, in nats per token).
3. Select: a greedy for the multiple-choice knapsack over the (bits, sensitivity) convex hulls.
4. Quantize: int8 layers to `Int8Linear` (per-row symmetric), int4 layers to `Int4Linear` at their
   group size, rounded by GPTQ (`method=gptq`, calibrated sequentially on the blocks already
   quantized) or to nearest (`method=rtn`). The layers are the same types `rtn-int4`/`awq`/`gptq`
   produce, so fuse-kernels and saving take them.

The report lists every layer's choice with the sensitivity of each choice, and the average bits. If
anything fails, every layer already swapped is put back.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

from ...core.config import PassConfig, check, check_regex
from ...core.errors import PassApplyError
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ..linears import as_linear, plan_linears, set_module, weight_rows
from .mixed_precision_select import CHOICE_NAMES, FLOAT, INT8, group_of

DEFAULT_CHOICES = "int4-g128+int4-g64+int4-g32+int8"


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig(PassConfig):
    bits: float = 4.5  # the budget: average stored bits per weight over the chosen layers
    choices: str = DEFAULT_CHOICES  # '+'-separated, from int4-g32/g64/g128/g256, int8, float
    method: Literal["gptq", "rtn"] = "gptq"  # how int4 layers are rounded
    sensitivity: Literal["fisher", "output"] = "fisher"  # output error weighted by the loss, or not
    tie: bool = True  # layers reading one input (q/k/v, gate/up) take one choice
    zero_point: bool = True
    zero_grid: Literal["integer", "float"] = "integer"  # as rtn-int4 / gptq: integer is exportable
    skip: str = "lm_head"
    calib_samples: int = 32
    calib_seq_len: int = 128
    damp: float = 0.01  # gptq's
    block_size: int = 128  # gptq's
    clip: bool = True  # gptq's range search

    @property
    def zero_mode(self) -> bool | str:
        return "float" if self.zero_point and self.zero_grid == "float" else self.zero_point

    @property
    def choice_list(self) -> list[str]:
        return [c.strip() for c in self.choices.split("+") if c.strip()]

    def __post_init__(self) -> None:
        check(math.isfinite(self.bits) and 1.0 <= self.bits <= 32.0,
              f"option 'bits' must be a number of bits per weight between 1 and 32; got {self.bits}")
        bad = [c for c in self.choice_list if c not in CHOICE_NAMES]
        check(bool(self.choice_list) and not bad, f"option 'choices' takes '+'-separated choices from "
              f"{', '.join(CHOICE_NAMES)} (e.g. {DEFAULT_CHOICES}); got {self.choices!r}")
        check(len(set(self.choice_list)) == len(self.choice_list), f"option 'choices' lists a choice twice: {self.choices!r}")
        check_regex("", "skip", self.skip)
        check(self.calib_samples >= 1, f"option 'calib_samples' must be >= 1; got {self.calib_samples}")
        check(self.calib_seq_len >= 2, f"option 'calib_seq_len' must be >= 2; got {self.calib_seq_len}")
        check(math.isfinite(self.damp) and 0 < self.damp <= 1, f"option 'damp' must be in (0, 1]; got {self.damp}")
        check(1 <= self.block_size <= 4096, f"option 'block_size' must be between 1 and 4096; got {self.block_size}")


def stored_layer_bits(layer: Any) -> int:
    """Bits a built layer stores for its weight: every buffer or parameter but the bias."""
    return sum(8 * t.numel() * t.element_size() for n, t in [*layer.named_parameters(), *layer.named_buffers()]
               if n != "bias")


class MixedPrecisionPass(ConfiguredPass):
    """Per-layer int4 (group 32..256) / int8 / float under an average bits-per-weight budget."""

    name = "mixed-precision"
    Config = MixedPrecisionConfig
    takes = frozenset({MODULE})
    lossy = True

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch

        from .gptq import calibration
        from .gptq_blocks import calibrate_and_round
        from .mixed_precision_probe import loss_moments, shared_inputs
        from .mixed_precision_select import BudgetError, Unit, select, sensitivities, stored_bits

        start = time.perf_counter()
        cfg = self.config
        plan = plan_linears(model, self.name, cfg.skip)
        if not plan.chosen:
            return plan.unchanged(model, {"layers_quantized": 0, "layers_skipped": len(plan.skipped)})
        layers = {n: plan.layers[n] for n in plan.chosen}
        choices = cfg.choice_list
        cost = {n: {c: stored_bits(c, *weight_rows(m).shape, m.weight.device, m.weight.element_size()) for c in choices}
                for n, m in layers.items()}
        total = sum(weight_rows(m).numel() for m in layers.values())
        cheapest = sum(min(c.values()) for c in cost.values()) / total
        if cheapest > cfg.bits:  # before any calibration: nothing to measure if nothing fits
            raise self._too_low(cheapest)
        batches, calib_info = calibration(model, ctx, cfg, self.name)
        moments, why = (loss_moments(model, batches, layers) if cfg.sensitivity == "fisher"
                        else (None, "sensitivity=output"))
        groups = shared_inputs(model, batches[0], layers) if cfg.tie else [[n] for n in layers]
        sens: dict[str, dict[str, float]] = {}

        def measure(name: str, h: Any, f: Any = None) -> None:
            w = weight_rows(layers[name]).detach()
            sens[name] = sensitivities(w, h, f, choices, cfg.zero_mode, w.device)

        with torch.no_grad():
            if moments is not None:  # the loss-weighted H came with the gradients
                for n, (f, h) in moments.items():
                    measure(n, h, f)
            else:  # block by block, as gptq calibrates: H = X^T X / n
                calibrate_and_round(model, batches, layers, lambda n, hsum: measure(n, hsum.hessian() / 2),
                                    f"{self.name}: measuring")
        units = [Unit(names, sum(weight_rows(layers[n]).numel() for n in names),
                      {c: sum(cost[n][c] for n in names) for c in choices},
                      {c: sum(sens[n][c] for n in names) for c in choices}) for names in groups]
        try:
            picked = select(units, cfg.bits * total)
        except BudgetError as exc:  # tied layers: one choice for the group can cost more than each layer's cheapest
            raise self._too_low(float(str(exc))) from None
        choice = {n: picked[i] for i, u in enumerate(units) for n in u.names}
        new = self._quantize(model, batches, layers, choice, plan)
        return PassResult(model, modified=True, info={
            **self._info(units, picked, choice, new, layers, plan, why, moments is not None), **calib_info,
            "quantize_seconds": round(time.perf_counter() - start, 2)})

    def _too_low(self, cheapest: float) -> PassApplyError:
        cfg = self.config
        return PassApplyError(f"{self.name}: bits={cfg.bits} is below what the cheapest of choices={cfg.choices} "
                              f"stores on this model ({cheapest:.3f} bits per weight); raise bits or add a cheaper "
                              "choice (int4-g128 or int4-g256)")

    def _quantize(self, model: Any, batches: list, layers: dict[str, Any], choice: dict[str, str], plan: Any) -> dict:
        """Swap every layer to its choice ({name: new layer}); on any failure put every layer back."""
        import torch

        from .gptq_blocks import calibrate_and_round
        from .head import int8_kernel

        cfg = self.config
        originals: dict[str, Any] = {}
        new: dict[str, Any] = {}

        def swap(name: str, layer: Any) -> None:
            for target in [name, *(a for a, p in plan.aliases.items() if p == name)]:
                originals.setdefault(target, model.get_submodule(target))
                set_module(model, target, layer)
            new[name] = layer

        try:
            with torch.no_grad():
                kernel8 = int8_kernel() if INT8 in choice.values() else "torch"
                for n, c in choice.items():
                    if c == INT8:
                        from ...layers.int8 import Int8Linear

                        swap(n, Int8Linear.from_linear(as_linear(layers[n]), kernel=kernel8))
                    elif group_of(c) is not None and cfg.method == "rtn":
                        swap(n, self._int4(layers[n], group_of(c), None))
                int4 = {n: layers[n] for n, c in choice.items() if group_of(c) is not None}
                if cfg.method == "gptq" and int4:
                    calibrate_and_round(model, batches, int4,
                                        lambda n, hsum: swap(n, self._int4(layers[n], group_of(choice[n]), hsum)),
                                        f"{self.name}: rounding")
        except BaseException:
            for name, module in originals.items():
                set_module(model, name, module)
            raise
        return new

    def _int4(self, lin: Any, g: int, hsum: Any) -> Any:
        """An Int4Linear of `lin` at group size `g`: GPTQ against `hsum`'s H, or round to nearest."""
        from ...layers.int4 import Int4Linear, choose_kernel, param_dtype_for
        from ...layers.int4_grid import quantize
        from .gptq_solver import gptq_quantize

        cfg = self.config
        w = weight_rows(lin).detach()
        kernel, _ = choose_kernel(w.device, w.shape[0], w.shape[1], g)
        dtype = param_dtype_for(kernel)
        if hsum is None:
            gq = quantize(w, g, cfg.zero_mode, dtype)
        else:
            gq, _ = gptq_quantize(w, hsum.hessian(), g, cfg.zero_mode, dtype, cfg.block_size, cfg.damp, False, cfg.clip)
        layer = Int4Linear.from_quantized(gq, lin.bias, kernel, w.device)
        layer.weight_dtype = w.dtype
        return layer

    def _info(self, units: list, picked: dict, choice: dict[str, str], new: dict[str, Any], layers: dict[str, Any],
              plan: Any, why: str, fisher_used: bool) -> dict[str, Any]:
        from .mixed_precision_select import describe

        cfg = self.config
        weights = sum(u.weights for u in units)
        stored = sum(stored_layer_bits(new.get(n, layers[n])) for n in layers)
        counts: dict[str, int] = {}
        for c in choice.values():
            counts[c] = counts.get(c, 0) + 1
        key = "predicted_loss_increase" if fisher_used else "output_error"  # nats per token, or unweighted
        uniform = {f"{key}_all_{c}": round(sum(u.sens[c] for u in units), 5) for c in cfg.choice_list}
        info: dict[str, Any] = {
            "bits_budget": cfg.bits, "bits_per_weight": round(stored / weights, 4),
            "layers_quantized": sum(1 for c in choice.values() if c != FLOAT), "layers_skipped": len(plan.skipped),
            **{f"layers_{c}": counts.get(c, 0) for c in cfg.choice_list},
            "method": cfg.method, "zero_point": cfg.zero_mode, "tie": cfg.tie, "units": len(units),
            "sensitivity": "fisher" if fisher_used else f"output ({why})",
            key: round(sum(u.sens[picked[i]] for i, u in enumerate(units)), 5), **uniform,
            **plan.info(),
        }
        for i, u in enumerate(units):
            for n in u.names:
                info[f"choice {n}"] = describe(u, picked[i])
        return info
