"""What the decoding passes share: the causal-LM check, verification prompts, and the identity check
that a changed decode loop still produces the plain greedy tokens."""
from __future__ import annotations

from typing import Any

import torch

from ...core.errors import PassApplyError
from ...core.modeling import model_device
from ...core.pass_protocol import PassContext
from ...generation import greedy_decode


def require_causal_lm(pass_name: str, ctx: PassContext, model: Any) -> None:
    """Refuse, with the reason, anything that is not a causal LM decoded token by token."""
    kind = getattr(ctx.workload, "kind", None)
    if ctx.workload is not None and kind != "causal-lm":
        raise PassApplyError(f"{pass_name}: needs a causal-LM workload (it changes how tokens are generated); "
                             f"workload {getattr(ctx.workload, 'name', '?')!r} is {kind!r}")
    if not isinstance(getattr(model, "config", None), _pretrained_config()):
        raise PassApplyError(f"{pass_name}: needs a transformers causal LM with a `.config`; "
                             f"got {type(model).__name__}")


def _pretrained_config() -> type:
    from transformers import PreTrainedConfig

    return PreTrainedConfig


def check_prompts(ctx: PassContext, count: int, vocab_size: int, length: int = 64) -> list[torch.Tensor]:
    """`count` prompts (1 x <= `length` ids) from the workload's calibration inputs, or seeded random
    ids without any; each second prompt repeats its first half, so n-gram lookup and multi-token
    acceptance are exercised too."""
    prompts: list[torch.Tensor] = []
    items = ctx.calibration_inputs(count)
    if not items:
        g = torch.Generator().manual_seed(0)
        items = [{"input_ids": torch.randint(0, vocab_size, (1, length), generator=g)} for _ in range(count)]
    for item in items:
        ids = _input_ids(item)
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
            continue
        ids = ids[:, :length]
        if len(prompts) % 2 == 1 and ids.shape[1] >= 8:
            half = ids[:, : ids.shape[1] // 2]
            ids = torch.cat([half, half], dim=1)
        prompts.append(ids)
    return prompts[:count]


def _input_ids(item: Any) -> torch.Tensor | None:
    args, kwargs = item if isinstance(item, tuple) and len(item) == 2 else ((), item)
    if isinstance(kwargs, dict) and isinstance(kwargs.get("input_ids"), torch.Tensor):
        return kwargs["input_ids"]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def verify_identical(pass_name: str, model: Any, prompts: list[torch.Tensor], new_tokens: int,
                     reference: Any = None) -> int:
    """Decode every prompt with the model's strategy and with the plain loop (or the `reference` strategy,
    e.g. the engine a speculative strategy verifies on); raise naming the first prompt and position where
    they differ. Returns the number of tokens compared."""
    device = model_device(model) or torch.device("cpu")
    compared = 0
    for i, prompt in enumerate(prompts):
        prompt = prompt.to(device)
        if reference is not None:
            with torch.inference_mode():
                plain = reference(model, prompt, new_tokens).tokens
        else:
            plain = greedy_decode(model, prompt, new_tokens, use_strategy=False).tokens
        changed = greedy_decode(model, prompt, new_tokens).tokens
        if not torch.equal(plain, changed):
            diff = (plain != changed).nonzero()
            at = int(diff[0, -1]) if diff.numel() else -1
            raise PassApplyError(f"{pass_name}: greedy output differs from plain decoding on check prompt {i} "
                                 f"at new token {at} ({int(plain[0, at])} vs {int(changed[0, at])}); refused")
        compared += plain.numel()
    return compared
