"""Decoding: our timed greedy loop (`greedy`), the sessions decode strategies serve (`sessions`), and
generate() through them (`hf_generate`, `hf_loop`).

This package stands on core, beside kernels; passes and workloads import it, and it imports none of
passes, workloads, bench, serving, search or cli. Every public name of the former `generation.py`
module is re-exported here, so `from optistack.generation import greedy_decode` keeps working.
"""
from .greedy import (
    TTFT_REPEATS,
    CacheUnsupportedError,
    Generation,
    cache_bytes_per_token,
    cache_kwarg,
    generation_measurements,
    greedy_decode,
    lease_cache,
    logits_of,
    new_cache,
    percentile,
    return_cache,
    takes_cache_position,
    takes_kwarg,
)
from .hf_generate import FastGenerate, carry_generate, install_generate, uninstall_generate
from .hf_loop import DecodeLoop
from .sessions import DecodeSession, ModelSession, SessionUnavailable, open_session

__all__ = ["TTFT_REPEATS", "CacheUnsupportedError", "DecodeLoop", "DecodeSession", "FastGenerate", "Generation",
           "ModelSession", "SessionUnavailable", "cache_bytes_per_token", "cache_kwarg", "carry_generate",
           "generation_measurements", "greedy_decode", "install_generate", "lease_cache", "logits_of", "new_cache",
           "open_session", "percentile", "return_cache", "takes_cache_position", "takes_kwarg", "uninstall_generate"]
