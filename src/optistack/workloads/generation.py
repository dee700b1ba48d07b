"""Our own greedy decode loop with a KV cache, timing every model call.

We do not use `model.generate`: the loop calls `model(...)` directly, so whatever callable an
optimization pass produced (a torch.compile'd module, a wrapper) is what gets timed. Speculative
decoding can reuse `greedy_decode` as its reference output.
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import WorkloadError


class CacheUnsupportedError(WorkloadError):
    """The model cannot be called with a KV cache (or silently ignores it)."""


@dataclass
class Generation:
    """Generated ids (batch, n) and per-call wall times; step_ms[0] is the prefill (time to first token)."""

    tokens: torch.Tensor
    step_ms: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """TTFT, median time per output token after the first, tokens/s, p99 per-token latency."""
        decode = self.step_ms[1:]
        if not decode:
            raise WorkloadError("generation metrics need at least 2 generated tokens")
        tpot = statistics.median(decode)
        return {
            "ttft_ms": self.step_ms[0],
            "tpot_ms": tpot,
            "tokens_per_s": 1000.0 / tpot if tpot > 0 else float("inf"),
            "p99_token_ms": _percentile(decode, 99.0),
            "gen_tokens": float(self.tokens.shape[-1]),
        }


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without needing numpy here."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def logits_of(outputs: Any, last_only: bool = False) -> torch.Tensor:
    """`.logits`, `["logits"]`, `[0]` or the tensor itself, as float32 (bf16 logits are upcast).

    `last_only` keeps just the last position before upcasting, so decoding does not copy all logits.
    """
    if hasattr(outputs, "logits"):
        outputs = outputs.logits
    elif isinstance(outputs, dict):
        outputs = outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    elif isinstance(outputs, (tuple, list)) and outputs:
        outputs = outputs[0]
    if not isinstance(outputs, torch.Tensor):
        try:
            outputs = torch.as_tensor(outputs)
        except Exception as exc:
            raise WorkloadError(f"cannot read logits from a {type(outputs).__name__} output") from exc
    if outputs.dim() != 3:
        raise WorkloadError(f"expected logits of shape (batch, seq, vocab), got {tuple(outputs.shape)}")
    return (outputs[:, -1:] if last_only else outputs).float()


def new_cache(model: Any) -> Any:
    """An empty transformers DynamicCache, shaped by the model's config when it has one."""
    from transformers import DynamicCache, PreTrainedConfig

    config = getattr(model, "config", None)
    return DynamicCache(config=config) if isinstance(config, PreTrainedConfig) else DynamicCache()


def cache_kwarg(model: Any) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.2x deprecates `past_key_values`),
    else `past_key_values`; looks through torch.compile wrappers to the original module."""
    target = getattr(model, "_orig_mod", model)
    try:
        params = inspect.signature(getattr(target, "forward", target)).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def greedy_decode(model: Any, input_ids: torch.Tensor, max_new_tokens: int, cache: Any = None) -> Generation:
    """Prefill `input_ids`, then feed back one argmax token per call until `max_new_tokens` exist.

    Never stops early (no EOS check), so timings always cover the same number of tokens.
    Raises CacheUnsupportedError when the model rejects the cache argument or does not fill the cache.
    """
    if max_new_tokens < 1:
        raise WorkloadError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cache = new_cache(model) if cache is None else cache
    cache_arg = {cache_kwarg(model): cache}
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    tokens: list[torch.Tensor] = []
    step_ms: list[float] = []
    ids = input_ids
    with torch.inference_mode():
        for step in range(max_new_tokens):
            sync()
            start = time.perf_counter()
            try:
                out = model(input_ids=ids, use_cache=True, **cache_arg)
            except Exception as exc:
                if step == 0:
                    raise CacheUnsupportedError(f"model cannot be called with a KV cache: {type(exc).__name__}: {exc}") from exc
                raise
            ids = logits_of(out, last_only=True)[:, -1].argmax(dim=-1, keepdim=True)
            sync()
            step_ms.append((time.perf_counter() - start) * 1000.0)
            if step == 0 and _cached_length(cache) != input_ids.shape[-1]:
                raise CacheUnsupportedError(f"model ignored the {next(iter(cache_arg))} argument (the cache is empty after prefill)")
            tokens.append(ids)
    return Generation(torch.cat(tokens, dim=-1), step_ms)


def _cached_length(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except Exception:
        return -1
