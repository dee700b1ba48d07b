"""Our own greedy decode loop with a KV cache, timing every model call (what the workloads measure).

Where this lives, and why: decoding is shared by the causal-LM workloads (which time and score it)
and by the decoding passes (kv-cache, speculative, prompt-compress), which must not import
workloads. It is not core either: core is the model-agnostic pass manager (protocol, pipeline,
runner, hooks) and imports no torch at module level, while this is torch code about transformers
caches. So the `generation` package stands beside `workloads` and `kernels`, on core (`core.hooks`
names the attributes it reads), and both passes and workloads import it.
`optistack.workloads.generation` re-exports this module.

`greedy_decode` does not use `model.generate`: it calls `model(...)` directly, so whatever callable an
optimization pass produced (a torch.compile'd module, a wrapper) is what gets timed. Users' own
`model.generate(...)` reaches the same strategies through `generation.hf_generate` (sessions).

Decode protocol (how a pass changes decoding without owning the workload; the names and Protocols
are in `core.hooks`). A pass sets attributes on the model; attribute reads pass through torch.compile
wrappers, so they survive a later `compile`:

- `model.optistack_cache` -- a cache factory: `factory(model, max_len) -> transformers Cache` (the
  cache for a prompt plus new tokens of `max_len` in all), optionally with `bytes_per_token(model)`,
  and `acquire` / `release` when its caches are pooled (lent to one caller at a time).
  `new_cache` asks it, so the plain loop and every decode strategy use the pass's cache (static,
  quantized). Without one the cache is a `DynamicCache`. A factory with `eager_prefill = True` has
  the prefill run by the module under a torch.compile wrapper (`_orig_mod`): only the fixed-shape
  decode step is compiled, and prompts of new lengths do not recompile.
- `model.optistack_decode` -- a decode strategy: `strategy(model, input_ids, max_new_tokens) ->
  Generation`, called by `greedy_decode` with the very callable it was given (the compiled wrapper,
  if any) in place of the one-token loop. It must return the same greedy tokens (speculative decoding).
  Its `open_session(model, batch, max_len)` serves generate() (`generation.sessions`).

A `Generation` records one wall time per model call: `step_ms[0]` is the prefill, which yields the
first token (time to first token). A call may yield several tokens (speculation accepts several draft
tokens at once); `tokens_per_step` then says how many, and `metrics()` switches to throughput: see
`Generation.metrics`.
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import WorkloadError
from ..core.hooks import CACHE_ATTR, DECODE_ATTR
from ..core.modeling import output_field, unwrap_compiled


class CacheUnsupportedError(WorkloadError):
    """The model cannot be called with a KV cache (or silently ignores it)."""


@dataclass
class Generation:
    """Generated ids (batch, n) and per-call wall times; step_ms[0] is the prefill (time to first token).

    `tokens_per_step[i]`: tokens call i yielded (None: one each). `kv_bytes_per_token`: bytes the KV
    cache holds per cached token (keys + values of every layer, plus quantization scales), or None.
    """

    tokens: torch.Tensor
    step_ms: list[float] = field(default_factory=list)
    tokens_per_step: list[int] | None = None
    kv_bytes_per_token: float | None = None

    def metrics(self, include_memory: bool = False) -> dict[str, float]:
        """TTFT, time per output token after the first, tokens/s, p99 per-token latency.

        One token per call (plain decoding): time per token is the median call after the prefill and
        tokens/s is its inverse. Several tokens per call (speculative decoding): a call's time is
        spread evenly over the tokens it yielded, time per token is total decode time / tokens after
        the first, tokens/s its inverse, p99 is taken over the spread per-token times, and
        `tokens_per_step` (mean tokens per decode call) is added. `include_memory` adds
        `kv_bytes_per_token` when known.
        """
        decode = self.step_ms[1:]
        if not decode:
            raise WorkloadError("generation metrics need at least 2 generated tokens")
        counts = self.tokens_per_step[1:] if self.tokens_per_step is not None else None
        if counts is None or all(c == 1 for c in counts):
            tpot = statistics.median(decode)
            per_token = decode
            extra: dict[str, float] = {}
        else:
            if len(counts) != len(decode) or min(counts) < 1:
                raise WorkloadError("generation: tokens_per_step must give >= 1 token for every step")
            tpot = sum(decode) / sum(counts)
            per_token = [ms / n for ms, n in zip(decode, counts) for _ in range(n)]
            extra = {"tokens_per_step": sum(counts) / len(counts)}
        out = {
            "ttft_ms": self.step_ms[0],
            "tpot_ms": tpot,
            "tokens_per_s": 1000.0 / tpot if tpot > 0 else float("inf"),
            "p99_token_ms": percentile(per_token, 99.0),
            "gen_tokens": float(self.tokens.shape[-1]),
            **extra,
        }
        if include_memory and self.kv_bytes_per_token is not None:
            out["kv_bytes_per_token"] = float(self.kv_bytes_per_token)
        return out


def percentile(values: list[float], q: float) -> float:
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
    outputs = output_field(outputs, "logits", "logits (batch, seq, vocab)", 3)
    return (outputs[:, -1:] if last_only else outputs).float()


def new_cache(model: Any, max_len: int | None = None) -> Any:
    """The model's pass-provided cache (`optistack_cache`) for `max_len` tokens, else an empty
    transformers DynamicCache, shaped by the model's config when it has one."""
    from transformers import DynamicCache, PreTrainedConfig

    factory = getattr(model, CACHE_ATTR, None)
    if factory is not None:
        if max_len is None:
            raise WorkloadError(f"{type(factory).__name__} builds caches of a fixed size: give max_len")
        return factory(model, max_len)
    config = getattr(model, "config", None)
    return DynamicCache(config=config) if isinstance(config, PreTrainedConfig) else DynamicCache()


def lease_cache(model: Any, max_len: int) -> Any:
    """A cache that this caller alone uses until `return_cache`: from the factory's `acquire` when it
    pools its caches (kv-cache's StaticCache, reused across generations so a compiled step replays),
    else a fresh one from `new_cache`. Concurrent decodes then never write into one cache."""
    acquire = getattr(getattr(model, CACHE_ATTR, None), "acquire", None)
    return acquire(model, max_len) if acquire is not None else new_cache(model, max_len)


def return_cache(model: Any, cache: Any) -> None:
    """Give a leased cache back to its factory's pool (a no-op for caches that are not pooled)."""
    release = getattr(getattr(model, CACHE_ATTR, None), "release", None)
    if release is not None and cache is not None:
        release(cache)


def cache_bytes_per_token(cache: Any) -> float | None:
    """Bytes a cache spends per token slot: each layer's own `bytes_per_token()` when it has one (a
    quantized layer counts codes + scales), else its tensors' bytes / capacity (static) or / cached
    tokens (dynamic). None when nothing is cached."""
    total, layers = 0.0, getattr(cache, "layers", None)
    if not layers:
        return None
    for layer in layers:
        own = getattr(layer, "bytes_per_token", None)
        if callable(own):
            total += float(own())
            continue
        capacity = layer.get_max_length() if hasattr(layer, "get_max_length") else -1
        capacity = capacity if capacity > 0 else int(layer.get_seq_length())
        tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]
        if capacity <= 0 or not tensors:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors) / capacity
    return total or None


def cache_kwarg(model: Any) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.2x deprecates `past_key_values`),
    else `past_key_values`; looks through torch.compile wrappers to the original module."""
    target = unwrap_compiled(model)
    try:
        params = inspect.signature(getattr(target, "forward", target)).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def takes_kwarg(model: Any, name: str) -> bool:
    """Whether the forward (looked up through torch.compile wrappers) takes keyword `name`."""
    target = unwrap_compiled(model)
    try:
        return name in inspect.signature(getattr(target, "forward", target)).parameters
    except (TypeError, ValueError):
        return False


def takes_cache_position(model: Any) -> bool:
    """Whether the forward takes `cache_position` (transformers LMs do): passing it keeps a compiled
    decode step free of the cache-length lookup it would otherwise trace (a graph break per step)."""
    return takes_kwarg(model, "cache_position")


def greedy_decode(model: Any, input_ids: torch.Tensor, max_new_tokens: int, cache: Any = None,
                  use_strategy: bool = True) -> Generation:
    """Prefill `input_ids`, then feed back one argmax token per call until `max_new_tokens` exist.

    When the model carries a decode strategy (`optistack_decode`, set by a pass such as
    `speculative`) and no `cache` is given, the strategy decodes instead; `use_strategy=False` forces
    the plain one-token loop (the reference a strategy is checked against).
    Never stops early (no EOS check), so timings always cover the same number of tokens.
    Raises CacheUnsupportedError when the model rejects the cache argument or does not fill the cache.
    """
    if max_new_tokens < 1:
        raise WorkloadError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    strategy = getattr(model, DECODE_ATTR, None) if use_strategy and cache is None else None
    if strategy is not None:
        return strategy(model, input_ids, max_new_tokens)
    leased = cache is None
    cache = lease_cache(model, input_ids.shape[-1] + max_new_tokens) if leased else cache
    try:
        return _greedy_loop(model, input_ids, max_new_tokens, cache)
    finally:
        if leased:
            return_cache(model, cache)


def _greedy_loop(model: Any, input_ids: torch.Tensor, max_new_tokens: int, cache: Any) -> Generation:
    cache_arg = {cache_kwarg(model): cache}
    eager_prefill = getattr(getattr(model, CACHE_ATTR, None), "eager_prefill", False)
    prefill = unwrap_compiled(model) if eager_prefill else model
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    with_position = takes_cache_position(model)
    # The prefill needs the last position's logits only: a transformers LM that takes
    # `logits_to_keep` then skips the head for the other prompt positions (SmolLM2: 127 of 128 rows of
    # a 49152-wide projection, a large part of the time to first token).
    prefill_kwargs = {"logits_to_keep": 1} if takes_kwarg(prefill, "logits_to_keep") else {}
    tokens: list[torch.Tensor] = []
    step_ms: list[float] = []
    ids = input_ids
    with torch.inference_mode():
        for step in range(max_new_tokens):
            sync()
            start = time.perf_counter()
            if with_position:
                done = 0 if step == 0 else input_ids.shape[-1] + step - 1
                cache_arg["cache_position"] = torch.arange(done, done + ids.shape[-1], device=ids.device)
            try:
                if step == 0:
                    out = prefill(input_ids=ids, use_cache=True, **cache_arg, **prefill_kwargs)
                else:
                    out = model(input_ids=ids, use_cache=True, **cache_arg)
            except Exception as exc:
                if step == 0:
                    raise CacheUnsupportedError(f"model cannot be called with a KV cache: {type(exc).__name__}: {exc}") from exc
                raise
            ids = logits_of(out, last_only=True)[:, -1].max(dim=-1, keepdim=True).indices  # argmax's, ~3x faster
            sync()
            step_ms.append((time.perf_counter() - start) * 1000.0)
            if step == 0 and _cached_length(cache) != input_ids.shape[-1]:
                raise CacheUnsupportedError(
                    f"model ignored the {next(iter(cache_arg))} argument (the cache is empty after prefill)"
                )
            tokens.append(ids)
    return Generation(torch.cat(tokens, dim=-1), step_ms, kv_bytes_per_token=cache_bytes_per_token(cache))


def _cached_length(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except Exception:
        return -1


TTFT_REPEATS = 5  # prefills timed per measurement: the TTFT ratio's CI resamples them


def generation_measurements(model: Any, prompt: torch.Tensor, gen_tokens: int,
                            ttft_repeats: int = TTFT_REPEATS) -> dict[str, Any]:
    """A causal-LM workload's extras: one warm-up, one timed greedy decode of `gen_tokens`, then
    `ttft_repeats - 1` more prefills. Returns `Generation.metrics` (with `ttft_ms` the median of every
    timed prefill) plus `samples`: the per-token decode times and the prefill times, from which the
    report bootstraps CIs for its decode tokens/s and TTFT ratios."""
    greedy_decode(model, prompt, 2)  # warm-up: first-call allocations, lazy init
    gen = greedy_decode(model, prompt, gen_tokens)
    out: dict[str, Any] = gen.metrics(include_memory=True)
    ttft = [gen.step_ms[0]] + [greedy_decode(model, prompt, 1).step_ms[0] for _ in range(ttft_repeats - 1)]
    out["ttft_ms"] = statistics.median(ttft)
    decode, counts = gen.step_ms[1:], (gen.tokens_per_step or [])[1:]
    per_token = [ms / n for ms, n in zip(decode, counts) for _ in range(n)] if counts else decode
    out["samples"] = {"decode_token_ms": [round(v, 4) for v in per_token], "ttft_ms": [round(v, 4) for v in ttft]}
    return out
