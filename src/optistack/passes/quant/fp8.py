"""`fp8`: E4M3 (`torch.float8_e4m3fn`) quantization of linear layers, in core torch.

- `mode=weight-only`: weights stored as fp8 with one float32 scale per output channel,
  dequantized to the input dtype in every forward, then `F.linear`. Quarters Linear weight memory;
  compute stays float.
- `mode=dynamic` (W8A8): additionally, each token's activations get a scale at run time
  (amax over the row / 448, the largest finite e4m3 value) and are cast to e4m3. On CUDA with
  compute capability >= 8.9 (Ada, Hopper) the matmul is `torch._scaled_mm` with row-wise scales
  (kernel `scaled_mm`); elsewhere both operands are quantized and dequantized in float and
  `F.linear` runs (kernel `emulated`).
- `scale=mse` (default): each output channel takes, among 8 scales from amax/448 to 2*amax/448 (one
  octave: e4m3 steps are relative, so this covers every alignment of the value grid, and none
  clips), the one with the least squared weight error. `scale=amax`: plain amax/448. On SmolLM2 the
  search cuts the KL divergence from the fp32 model by ~40% (perplexity +0.1% instead of +2.0%).

The emulated path exists so the accuracy cost of fp8 can be measured on any machine. It is
**slower than fp32 on CPU**: every call dequantizes the weights (and, in dynamic mode, quantizes
and dequantizes the activations) before an ordinary float matmul. Only weight memory shrinks.

Each chosen layer (nn.Linear or transformers Conv1D, picked by `passes/linears.py`) is replaced by
an `Fp8Linear` (optistack.layers.fp8) holding `weight_fp8`, `weight_scale` and `bias` as buffers; its read-only `.weight`
dequantizes on access. Weights shared with another module (tied embeddings) are left in float, since
a private fp8 copy would add memory instead of saving it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from ...core.config import PassConfig, check, check_regex
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import need_cuda
from ...layers.fp8 import Fp8Linear
from ..linears import as_linear, plan_linears, replace_layers

_SCALED_MM_ALIGN = 16  # cuBLASLt fp8: K and N must be multiples of 16


@dataclasses.dataclass(frozen=True)
class Fp8Config(PassConfig):
    mode: Literal["weight-only", "dynamic"] = "weight-only"
    skip: str = "lm_head"
    min_features: int = 16
    scale: Literal["mse", "amax"] = "mse"

    def __post_init__(self) -> None:
        check_regex("fp8", "skip", self.skip)
        check(self.min_features >= 1, f"fp8: option 'min_features' must be >= 1; got {self.min_features}")


def _bytes(tensors: list[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Fp8Pass(ConfiguredPass):
    """E4M3 weights (per-channel scales), optionally per-token e4m3 activations (W8A8)."""

    name = "fp8"
    Config = Fp8Config
    takes = frozenset({MODULE})
    lossy = True
    copy_on_write = True  # swaps in new layers, never writes into its input's tensors

    def _kernel(self, device: torch.device) -> tuple[str, str | None]:
        """("scaled_mm", None) where the fp8 matmul runs on this GPU, else ("emulated", why not or None)."""
        if self.config.mode != "dynamic" or device.type != "cuda":
            return "emulated", None
        avail = need_cuda((8, 9))
        if not avail:
            return "emulated", avail.reason
        try:  # probe once: a build without the row-wise kernel for this GPU fails here, not in forward
            Fp8Linear(32, 32, mode="dynamic", kernel="scaled_mm", device=device)(torch.ones(16, 32, device=device))
        except RuntimeError as exc:
            return "emulated", f"torch._scaled_mm failed on this GPU: {str(exc).splitlines()[0]}"
        return "scaled_mm", None

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        plan = plan_linears(model, self.name, self.config.skip, self.config.min_features)
        done = len(plan.chosen) + len(plan.aliases)
        info: dict[str, Any] = {"mode": self.config.mode, "scale": self.config.scale,
                                "linears_quantized": done, "linears_skipped": len(plan.layers) - done}
        if not plan.chosen:
            return plan.unchanged(model, info)
        info.update(plan.info())
        kernel, why_emulated = self._kernel(plan.layers[plan.chosen[0]].weight.device)
        info["kernel"] = kernel
        if why_emulated:
            info["kernel_reason"] = why_emulated
        before = after = emulated = 0

        def build(name: str, layer: Any) -> Fp8Linear:
            nonlocal before, after, emulated
            lin, k = as_linear(layer), kernel
            if k == "scaled_mm" and (lin.in_features % _SCALED_MM_ALIGN or lin.out_features % _SCALED_MM_ALIGN):
                k, emulated = "emulated", emulated + 1
            new = Fp8Linear.from_linear(lin, mode=self.config.mode, kernel=k, scale=self.config.scale)
            before += _bytes([lin.weight, lin.bias])
            after += _bytes([new.weight_fp8, new.weight_scale, new.bias])
            return new

        with torch.no_grad():
            replace_layers(model, plan, build)
        if kernel == "scaled_mm":
            info["linears_emulated"] = emulated  # dims not multiples of 16: scaled_mm cannot take them
        info.update(quantized_bytes_before=before, quantized_bytes_after=after)
        return PassResult(model, modified=True, info=info)
