"""Serving an optimized causal LM: many requests at once, measured under load, behind an HTTP API.

- `backend`: the contract every serving backend keeps (`Backend.submit` -> `RequestHandle`), and the
  per-request sampling parameters. The LoadGen harness and the HTTP server speak only to it.
- `engine_backend`: continuous batching on optistack's C++ decode engine (rows join and leave between
  steps, prefill chunked and interleaved with running decodes).
- `stock`: the unoptimized model served by transformers' own continuous batching (the baseline).
- `loadgen_scenario`: MLPerf LoadGen Offline and Server scenarios over any backend.
- `http`: `optistack serve`, an OpenAI-compatible API on Starlette/uvicorn.
- `http_client`: `HttpBackend`, the contract over any OpenAI-compatible server, so the LoadGen scenario
  can drive `optistack serve` (or a peer's server) over HTTP.

`generate()` itself (one caller, transformers' own API) is served by `optistack.generation`, which the
decoding passes install; this package sits above the passes.
"""
from __future__ import annotations

from typing import Any


def backends_for(model: Any, tokenizer: Any = None, *, max_batch: int = 8, max_context: int | None = None,
                 kv: str | None = None) -> Any:
    """The serving backend for `model`: the C++ engine's continuous batching (`EngineBackend`) for a model whose
    `decode-engine` step built an engine, else transformers' own continuous batching on the model as it is
    (`StockBackend`), else one request at a time through its `generate()` (`SimpleBackend`). `kv`: the engine's
    KV cache type (None: EngineBackend.from_model's default, int8 with int8 activations)."""
    from ..core.hooks import DECODE_ATTR

    engine = getattr(getattr(model, DECODE_ATTR, None), "weights", None)
    if engine is not None and hasattr(engine, "runtime"):
        from .engine_backend import EngineBackend

        return EngineBackend.from_model(model, max_batch=max_batch, max_context=max_context, kv=kv)
    if kv is not None:
        from .backend import ServingError

        raise ServingError(f"kv={kv!r} chooses the decode engine's KV cache, and this {type(model).__name__} has no "
                           "engine (run the decode-engine pass first, or leave kv unset)")
    if callable(getattr(model, "init_continuous_batching", None)):
        from .stock import StockBackend

        return StockBackend(model, tokenizer, max_batch=max_batch, max_context=max_context,
                            name=f"transformers continuous batching ({type(model).__name__})")
    from .simple_backend import SimpleBackend

    return SimpleBackend(model, max_context)


_LAZY = {
    "Backend": ("backend", "Backend"),
    "RequestHandle": ("backend", "RequestHandle"),
    "SamplingParams": ("backend", "SamplingParams"),
    "ServingError": ("backend", "ServingError"),
    "EngineBackend": ("engine_backend", "EngineBackend"),
    "StockBackend": ("stock", "StockBackend"),
    "SimpleBackend": ("simple_backend", "SimpleBackend"),
    "HttpBackend": ("http_client", "HttpBackend"),
}


def __getattr__(name: str) -> Any:  # lean: nothing heavy is imported until a name is used
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
