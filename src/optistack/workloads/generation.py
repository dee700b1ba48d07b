"""Moved: the decode loop lives in `optistack.generation` (passes and workloads both use it, and passes
must not import workloads). This module re-exports it so existing imports keep working."""
from __future__ import annotations

from ..core.hooks import CACHE_ATTR, DECODE_ATTR
from ..generation import (
    TTFT_REPEATS,
    CacheUnsupportedError,
    Generation,
    cache_bytes_per_token,
    cache_kwarg,
    generation_measurements,
    greedy_decode,
    logits_of,
    new_cache,
    percentile,
    takes_cache_position,
    takes_kwarg,
)

__all__ = ["CACHE_ATTR", "DECODE_ATTR", "TTFT_REPEATS", "CacheUnsupportedError", "Generation", "cache_bytes_per_token",
           "cache_kwarg", "generation_measurements", "greedy_decode", "logits_of", "new_cache", "percentile",
           "takes_cache_position", "takes_kwarg"]
