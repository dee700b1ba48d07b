"""Decode sessions: how a decode strategy serves transformers' generate() (and our own loops).

generate() owns sampling, logits processors and stopping; a strategy owns only the model calls and the
cache. The `DecodeSession` protocol is that boundary: one session is one generate() call's rows, opened
with `open_session(model, batch, max_len)` and closed when the call ends.

`ModelSession` is the generic session: the model's own forward on a transformers cache (the model's
`optistack_cache` factory when it has one, e.g. kv-cache's StaticCache for the compiled step; else a
DynamicCache). Every session leases its own cache (`lease_cache`: a pooled StaticCache is lent to one
session at a time, a second concurrent session gets a second cache), so concurrent generate() calls never
write into one cache.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..core.errors import PassApplyError, WorkloadError
from ..core.hooks import CACHE_ATTR, DECODE_ATTR
from ..core.modeling import unwrap_compiled
from .greedy import cache_kwarg, lease_cache, return_cache, takes_cache_position, takes_kwarg


class SessionUnavailable(WorkloadError):
    """A strategy cannot serve this request (device, size, ...): generate() then runs the model's own loop
    with one warning naming the reason. Raise it from `open_session` (or `prefill`, before any token)."""


@runtime_checkable
class DecodeSession(Protocol):
    """One generate() call's rows on a decode strategy.

    - `prefill(input_ids [B, T], attention_mask [B, T] | None) -> logits [B, V]`: left-padded rows are
      allowed; each row decodes as it would alone (positions start at 0 at its first real token, padding
      is never attended); the logits are each row's last position's.
    - `extend(tokens [B, n], active [B] | None) -> logits [B, n, V]`: feed n tokens per row (n=1: a decode
      step; n>1: speculative verification), the logits after each. `active` is a hint: rows that are False
      have finished and may be skipped (their logits are then zeros).
    - `rewind(length)`: forget cached positions so each row's sequence as the caller holds it (its prompt,
      with its left padding, + accepted tokens) has `length` tokens; for an unpadded row that is its own
      prompt + accepted tokens (speculative rejection; batch 1 is enough).
    - `close()`: free slots/caches; idempotent.

    Returned logits are float32 tensors that later calls never overwrite. generate() calls every method
    under `torch.inference_mode()` (caches made there stay usable by greedy_decode, which runs there too)
    and copies the logits it keeps out of inference mode.
    """

    batch: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def extend(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor: ...

    def rewind(self, length: int) -> None: ...

    def close(self) -> None: ...


class ModelSession:
    """The model's own forward on a transformers cache it leases for the session (see the module docstring).

    `model` is the callable that decodes (a torch.compile wrapper, if any: the compiled step); the prefill
    runs on the module under it when the cache factory asks for `eager_prefill`. Left padding: the session
    keeps a 2D attention mask of the whole capacity and per-row positions, and passes both to every call
    (for a static cache the mask keeps one shape, so a compiled step replays); without padding it passes
    neither, exactly like `greedy_decode`. Thread safety: one session is one caller's; several sessions can
    run at once as far as the model's forward can (each has its own cache).
    """

    def __init__(self, model: Any, batch: int, max_len: int) -> None:
        if batch < 1 or max_len < 1:
            raise WorkloadError(f"a decode session needs >= 1 row and >= 1 position; got {batch} x {max_len}")
        self.model, self.batch, self.max_len = model, batch, max_len
        factory = getattr(model, CACHE_ATTR, None)
        try:
            self.cache = lease_cache(model, max_len)
        except PassApplyError as exc:  # e.g. a fixed max_cache_len smaller than this request
            raise SessionUnavailable(str(exc)) from exc
        self._arg = cache_kwarg(model)
        self._prefill_fn = unwrap_compiled(model) if getattr(factory, "eager_prefill", False) else model
        self._prefill_kwargs = {"logits_to_keep": 1} if takes_kwarg(self._prefill_fn, "logits_to_keep") else {}
        self._cache_position = takes_cache_position(model)
        self._static = bool(getattr(self.cache, "is_compileable", False))
        capacity = max((getattr(layer, "max_cache_len", 0) for layer in getattr(self.cache, "layers", [])), default=0)
        self._mask_len = max(max_len, int(capacity))
        self.past = 0  # cached positions per row, left padding included
        self._mask: torch.Tensor | None = None  # (B, capacity) when some row is padded
        self._next: torch.Tensor | None = None  # (B,) each padded row's next position

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = input_ids.shape
        if batch != self.batch or length > self.max_len:
            raise WorkloadError(f"this session holds {self.batch} rows of <= {self.max_len} positions; "
                                f"the prompt is {batch} x {length}")
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True, self._arg: self.cache, **self._prefill_kwargs}
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = torch.ones(batch, self._mask_len, dtype=attention_mask.dtype, device=attention_mask.device)
            mask[:, :length] = attention_mask
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            self._mask, self._next = mask, positions[:, -1] + 1
            kwargs["attention_mask"], kwargs["position_ids"] = attention_mask, positions
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(length, device=input_ids.device)
        with torch.inference_mode():
            out = self._prefill_fn(**kwargs)
        self.past = length
        return _logits(out, 1)[:, -1]

    def extend(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        n = tokens.shape[1]
        if self.past + n > self._mask_len:
            raise WorkloadError(f"this session holds {self._mask_len} positions; {self.past} are filled and "
                                f"{n} more were fed")
        kwargs: dict[str, Any] = {"input_ids": tokens, "use_cache": True, self._arg: self.cache}
        if self._mask is not None:
            kwargs["attention_mask"] = self._mask if self._static else self._mask[:, : self.past + n]
            kwargs["position_ids"] = self._next[:, None] + torch.arange(n, device=tokens.device)
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(self.past, self.past + n, device=tokens.device)
        with torch.inference_mode():
            out = self.model(**kwargs)
        self.past += n
        if self._next is not None:
            self._next = self._next + n
        return _logits(out, n)

    def rewind(self, length: int) -> None:
        drop = self.past - length
        if drop < 0 or length < 1:
            raise WorkloadError(f"cannot rewind to {length} positions: the session holds {self.past}")
        if drop:
            with torch.inference_mode():
                self.cache.crop(-drop)
            self.past = length
            if self._next is not None:
                self._next = self._next - drop

    def close(self) -> None:
        cache, self.cache = self.cache, None
        return_cache(self.model, cache)


def _logits(out: Any, n: int) -> torch.Tensor:
    """The last `n` positions' logits as float32 (no copy when they are float32 already: a fresh forward's
    output; generate()'s loop makes the one copy `_sample` makes too, out of inference mode)."""
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -n:].float()


def open_session(model: Any, batch: int, max_len: int) -> DecodeSession:
    """A session on the model's decode strategy (its `open_session`), else a `ModelSession` (a model with
    only a cache factory, or a strategy without sessions yet). `model` is the callable that decodes."""
    strategy = getattr(model, DECODE_ATTR, None)
    opener = getattr(strategy, "open_session", None)
    if opener is not None:
        return opener(model, batch, max_len)
    return ModelSession(model, batch, max_len)
