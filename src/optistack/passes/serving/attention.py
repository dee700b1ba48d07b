"""`attention`: choose how a transformers model computes attention.

- `impl=sdpa` (default): `torch.nn.functional.scaled_dot_product_attention`, with `backend=` one of
  auto (torch picks), math (plain matmul/softmax, everywhere), flash (FlashAttention kernels: CUDA, and a
  CPU implementation in torch), efficient (memory-efficient, CUDA), cudnn (CUDA). A chosen backend is
  enforced with `torch.nn.attention.sdpa_kernel` around every forward, through forward hooks, so the model
  keeps its class (it saves, compiles and generates as before) and torch raises rather than silently
  falling back when the backend cannot take the inputs.
- `impl=eager`: transformers' own matmul + softmax attention.
- `impl=flash_attention_2`: the `flash-attn` package's kernels (CUDA only); unavailable without it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Literal

import torch

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.load_registry import register_reapply
from ...core.load_schema import choice
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, need_cuda, need_packages
from .causal import refuse_unless_causal_lm

_CUDA_ONLY_BACKENDS = ("efficient", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(PassConfig):
    impl: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    backend: Literal["auto", "math", "flash", "efficient", "cudnn"] = "auto"
    causal_lm_only: bool = True  # a serving pass: refuse other workloads unless told (false: any HF model)

    def __post_init__(self) -> None:
        check(self.backend == "auto" or self.impl == "sdpa",
              f"attention: option 'backend' selects an SDPA kernel; it needs impl=sdpa, got impl={self.impl}")


def sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


class SdpaBackendHooks:
    """Enters `sdpa_kernel(backend)` before the model's forward and leaves it after (even on error)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._open: list[Any] = []

    def before(self, module: torch.nn.Module, args: Any) -> None:
        from torch.nn.attention import sdpa_kernel

        ctx = sdpa_kernel([sdpa_backend(self.backend)])
        ctx.__enter__()
        self._open.append(ctx)

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after, always_call=True)


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


class AttentionPass(ConfiguredPass):
    """Sets the attention implementation of a transformers model (and the SDPA backend)."""

    name = "attention"
    Config = AttentionConfig
    takes = frozenset({MODULE})
    reapply_on_load = True  # the choice lives in the config and in forward hooks, not in tensors

    def requirements(self) -> Availability:
        cfg = self.config
        has_hf = need_packages("transformers", extra="hf")
        if not has_hf:
            return has_hf
        if cfg.impl == "flash_attention_2":
            if importlib.util.find_spec("flash_attn") is None:
                return Availability.no("impl=flash_attention_2 needs the flash-attn package (CUDA only, built from "
                                       "source); pip install flash-attn --no-build-isolation on a CUDA machine")
            return need_cuda((8, 0))
        if cfg.backend in _CUDA_ONLY_BACKENDS:
            avail = need_cuda()
            if not avail:
                return Availability.no(f"backend={cfg.backend} is a CUDA kernel: {avail.reason}")
        return Availability.yes()

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        refuse_unless_causal_lm(self.name, ctx, self.config.causal_lm_only, model)
        if not _is_hf_model(model):
            raise PassApplyError(f"attention: sets a transformers model's attn_implementation; got "
                                 f"{type(model).__name__}, which is not a transformers PreTrainedModel")
        cfg = self.config
        before = getattr(model.config, "_attn_implementation", None)
        try:
            model.set_attn_implementation(cfg.impl)
        except (ValueError, ImportError) as exc:
            raise PassApplyError(f"attention: {type(model).__name__} cannot use impl={cfg.impl}: {exc}") from exc
        info: dict[str, Any] = {"impl_before": before, "impl": cfg.impl, "backend": cfg.backend}
        if cfg.backend != "auto":
            SdpaBackendHooks(cfg.backend).attach(model)
        return PassResult(model, modified=before != cfg.impl or cfg.backend != "auto", info=info)


register_reapply(AttentionPass, {"impl": choice("sdpa", "eager")})
