"""`kv-cache`: choose the KV cache the decode loop uses.

- `impl=static`: a transformers `StaticCache` preallocated for `max_cache_len` tokens (default: the
  prompt + new tokens rounded up to a multiple of `bucket`). Every decode step then has the same tensor
  shapes and the cache position is a tensor, so a following `compile` captures the decode step once and
  replays it: `kv-cache{impl=static},compile` is the intended chain. Eager, it only preallocates.
- `impl=quantized`: our `QuantizedKVCache` (int8 or int4 codes, per-token groups of `group_size`
  channels, fp16 scale and minimum per group); on SmolLM2 it cuts the bytes held per token 3.8x
  (int8, whole-head groups) or 6.4x (int4, 32-channel groups) against fp32, perplexity within 0.3%.
  Not compileable (its cache grows), and slower per step: memory, not speed, is what it buys.
- `impl=dynamic`: the default transformers `DynamicCache` (useful to undo an earlier choice).

The pass sets the cache factory (`optistack_cache`, see `core/hooks.py` and `generation/`) on the model: the
weights are untouched and every decode strategy (plain greedy, `speculative`) uses the chosen cache, and so
does the model's `generate()`, which the pass installs (`generation.install_generate`).
Generations report the cache's bytes per token (`Generation.kv_bytes_per_token`); the pass's info
gives the same number computed from the model's shape.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any, Literal, Optional

import torch

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.hooks import CACHE_ATTR
from ...core.load_registry import register_reapply
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, need_packages
from ...generation import install_generate
from .common import require_causal_lm


@dataclasses.dataclass(frozen=True)
class KvCacheConfig(PassConfig):
    impl: Literal["static", "quantized", "dynamic"] = "static"
    max_cache_len: Optional[int] = None
    bucket: int = 256
    bits: Literal[8, 4] = 8
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        check(self.max_cache_len is None or self.max_cache_len >= 2,
              f"kv-cache: option 'max_cache_len' must be >= 2 tokens (or none: prompt + new tokens); got {self.max_cache_len}")
        check(self.bucket >= 1, f"kv-cache: option 'bucket' must be >= 1; got {self.bucket}")
        check(self.group_size is None or (self.group_size >= 2 and self.group_size % 2 == 0),
              f"kv-cache: option 'group_size' must be an even number >= 2 (or none: one group per head); got {self.group_size}")


class StaticCacheFactory:
    """`StaticCache`s per size, reset and reused across generations (same tensors: no recompiles).
    The prefill runs eagerly (`eager_prefill`): prompt lengths vary, the decode step's shapes do not.

    A cache is shared mutable state, so callers lease one: `acquire` lends a cache no one else holds
    (creating a second one of the size when every existing one is lent, e.g. two concurrent generate()
    calls) until `release`. `factory(model, max_len)` (the plain protocol) returns one that is not lent,
    without lending it. Sequential callers keep getting the same cache, so a compiled step replays."""

    eager_prefill = True

    def __init__(self, max_cache_len: int | None, bucket: int) -> None:
        self.max_cache_len, self.bucket = max_cache_len, bucket
        self._caches: dict[int, list[Any]] = {}  # size -> its caches
        self._lent: set[int] = set()  # ids of the caches lent out
        self._lock = threading.Lock()

    def __call__(self, model: Any, max_len: int) -> Any:
        return self._get(model, max_len, lend=False)

    def acquire(self, model: Any, max_len: int) -> Any:
        return self._get(model, max_len, lend=True)

    def release(self, cache: Any) -> None:
        with self._lock:
            self._lent.discard(id(cache))

    def _get(self, model: Any, max_len: int, lend: bool) -> Any:
        from transformers import StaticCache

        size = self.max_cache_len or self.bucket * math.ceil(max_len / self.bucket)
        if max_len > size:
            raise PassApplyError(f"kv-cache: a generation needs {max_len} cache slots but max_cache_len={size}; "
                                 "raise max_cache_len or leave it unset")
        with self._lock:
            pool = self._caches.setdefault(size, [])
            cache = next((c for c in pool if id(c) not in self._lent), None)
            fresh = cache is None
            if fresh:
                cache = batch_aware(StaticCache(config=model.config, max_cache_len=size))
                pool.append(cache)
            if lend:
                self._lent.add(id(cache))
        if not fresh:
            with torch.inference_mode():  # its tensors were made in inference mode by the first decode
                cache.reset()
        return cache

    def __reduce__(self) -> tuple:  # caches (and the lock) are rebuilt, not copied or pickled
        return StaticCacheFactory, (self.max_cache_len, self.bucket)

    def __deepcopy__(self, memo: dict) -> "StaticCacheFactory":
        return StaticCacheFactory(self.max_cache_len, self.bucket)


def batch_aware(cache: Any) -> Any:
    """Let one StaticCache serve prompts of several batch sizes. transformers sizes a static layer by
    the first batch it sees and then refuses others; here a layer keeps one pair of tensors per batch
    size and swaps them in when the (eager) prefill brings another batch. Each batch size keeps the
    same tensors across generations, so a compiled decode step compiles once per batch size and
    replays it when that size comes back."""
    for layer in getattr(cache, "layers", []):
        if type(layer) is _static_layer_types()[0]:
            layer.__class__ = _static_layer_types()[1]
            layer.by_batch = {}
    return cache


@functools.lru_cache(maxsize=1)
def _static_layer_types() -> tuple[type, type]:
    from transformers.cache_utils import StaticLayer

    class BatchStaticLayer(StaticLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            batch = key_states.shape[0]
            if self.is_initialized and batch != self.batch_size:
                self.by_batch[self.batch_size] = (self.keys, self.values)
                if batch in self.by_batch:
                    self.keys, self.values = self.by_batch[batch]
                    self.keys.zero_(), self.values.zero_()
                    self.batch_size = batch
                else:
                    self.lazy_initialization(key_states, value_states)
            return super().update(key_states, value_states, *args, **kwargs)

    return StaticLayer, BatchStaticLayer


class QuantizedCacheFactory:
    def __init__(self, bits: int, group_size: int | None) -> None:
        self.bits, self.group_size = bits, group_size

    def __call__(self, model: Any, max_len: int) -> Any:
        from .quantized_cache import QuantizedKVCache

        layers, _, head_dim = kv_shape(model.config)
        return QuantizedKVCache(layers, self.bits, default_group(self.bits, self.group_size, head_dim))


def default_group(bits: int, group_size: int | None, head_dim: int) -> int:
    """The group size given, else the whole head for int8 and 32 channels for int4 (on SmolLM2, int4 with
    64-channel groups raises perplexity ~6%, with 32-channel groups it stays within 0.3%)."""
    if group_size:
        return group_size
    return 32 if bits == 4 and head_dim % 32 == 0 else head_dim


class DynamicCacheFactory:
    def __call__(self, model: Any, max_len: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def bytes_per_token(config: Any, impl: str, dtype_bytes: int, bits: int = 8, group_size: int | None = None) -> float:
    """KV bytes per cached token: layers x 2 (K, V) x kv_heads x (head_dim x value bytes + scales)."""
    layers, kv_heads, head_dim = kv_shape(config)
    group_size = default_group(bits, group_size, head_dim)
    if impl != "quantized":
        return float(layers * 2 * kv_heads * head_dim * dtype_bytes)
    per_vector = head_dim * bits / 8 + (head_dim // group_size) * 2 * 2  # codes + fp16 scale + fp16 min
    return float(layers * 2 * kv_heads * per_vector)


class KvCachePass(ConfiguredPass):
    """Sets the cache factory the decode loop uses; weights untouched."""

    name = "kv-cache"
    Config = KvCacheConfig
    takes = frozenset({MODULE})
    reapply_on_load = True  # the factory is an attribute, not a tensor

    def requirements(self) -> Availability:
        return need_packages("transformers", extra="hf")  # its caches and decode loop are transformers'

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        cfg = self.config
        require_causal_lm(self.name, ctx, model)
        layers, kv_heads, head_dim = kv_shape(model.config)
        if cfg.impl == "quantized" and cfg.group_size and head_dim % cfg.group_size:
            raise PassApplyError(f"kv-cache: option 'group_size' ({cfg.group_size}) must divide the model's "
                                 f"head_dim ({head_dim})")
        if cfg.impl == "static":
            factory: Any = StaticCacheFactory(cfg.max_cache_len, cfg.bucket)
        elif cfg.impl == "quantized":
            factory = QuantizedCacheFactory(cfg.bits, cfg.group_size)
        else:
            factory = DynamicCacheFactory()
        object.__setattr__(model, CACHE_ATTR, factory)
        dtype_bytes = next(model.parameters()).element_size()
        per_token = bytes_per_token(model.config, cfg.impl, dtype_bytes, cfg.bits, cfg.group_size)
        info = {"impl": cfg.impl, "kv_bytes_per_token": per_token,
                "kv_bytes_per_token_full": bytes_per_token(model.config, "dynamic", dtype_bytes)}
        if cfg.impl == "static" and cfg.max_cache_len:
            info["max_cache_len"] = cfg.max_cache_len
        install_generate(model)  # the user's generate() decodes on this cache (generation/hf_generate.py)
        return PassResult(model, modified=True, info=info)


register_reapply(KvCachePass)
