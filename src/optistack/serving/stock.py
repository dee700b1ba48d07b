"""The unoptimized baseline: a transformers model served by transformers' own continuous batching.

`StockBackend` keeps the `Backend` contract (backend.py) on `model.init_continuous_batching(...)`: requests
join and leave the running batch between steps, prefill is chunked to `max_batch_tokens`, the KV cache is
paged and sized for `max_batch` requests of `max_context` tokens. Tokens stream: each step's output is
delivered as it comes (`streaming=True`), so a handle's first token time is the real time to first token.

transformers fixes greedy-or-sampling per manager, so greedy requests and sampling requests go to two
managers (the second is made on the first sampling request). Sampling takes temperature, top_k and top_p
per request. What transformers' continuous batching cannot do per request is refused at `submit` with a
ServingError naming the field: `min_new_tokens` (its MinNewTokens processor does not run batched),
`repetition_penalty` (same), and `seed` for sampling (one generator is shared by every request).
Stopping: a request ends at `max_new_tokens` or at one of its `stop_token_ids` (kept in the tokens); the
model's own EOS stops a request only when it is listed there.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable

from .backend import RequestHandle, SamplingParams, ServingError, check_request

_POLL_S = 0.02  # how often a dispatcher looks for cancelled handles while no output arrives
_PAGE = 64  # KV cache page (tokens); small pages waste little on short requests


class StockBackend:
    """Continuous batching with transformers' `ContinuousBatchingManager` on the model as it is."""

    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch: int = 8, max_context: int | None = None,
                 max_batch_tokens: int | None = None, name: str = "stock") -> None:
        if not callable(getattr(model, "init_continuous_batching", None)):
            raise ServingError(f"StockBackend needs a transformers PreTrainedModel (with init_continuous_batching); "
                               f"got {type(model).__name__}")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(config, "max_position_embeddings", None)
        if not (isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch >= 1):
            raise ServingError(f"max_batch must be an integer >= 1; got {max_batch!r}")
        if max_context is None:
            max_context = min(limit, 2048) if isinstance(limit, int) else 2048
        if not (isinstance(max_context, int) and not isinstance(max_context, bool) and max_context >= 2):
            raise ServingError(f"max_context must be an integer >= 2; got {max_context!r}")
        if isinstance(limit, int) and max_context > limit:
            raise ServingError(f"max_context {max_context} exceeds the model's {limit} positions "
                               f"(max_position_embeddings); give max_context <= {limit}")
        if max_batch_tokens is None:
            max_batch_tokens = min(max_context, 256)
        if not (isinstance(max_batch_tokens, int) and not isinstance(max_batch_tokens, bool) and max_batch_tokens >= 1):
            raise ServingError(f"max_batch_tokens must be an integer >= 1; got {max_batch_tokens!r}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_batch, self.max_context, self.max_batch_tokens = max_batch, max_context, max_batch_tokens
        self.vocab_size = getattr(config, "vocab_size", None)
        self._managers: dict[str, Any] = {}  # "greedy" / "sample" -> ContinuousBatchingManager
        self._threads: list[threading.Thread] = []
        self._handles: dict[str, tuple[RequestHandle, str]] = {}  # request id -> (handle, manager kind)
        self._lock = threading.Lock()
        self._closed = threading.Event()

    # ------------------------------------------------------------------ the Backend contract
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[RequestHandle, int], None] | None = None,
               on_done: Callable[[RequestHandle], None] | None = None) -> RequestHandle:
        if self._closed.is_set():
            raise ServingError(f"backend {self.name!r} is closed; make a new one")
        check_request(self, prompt_ids, params, self.vocab_size)
        _check_supported(params)
        handle = RequestHandle(prompt_ids, params, request_id, on_token, on_done)
        kind = "sample" if params.do_sample else "greedy"
        kwargs: dict[str, Any] = {}
        if params.do_sample:  # every warper is present in the sampling manager: give each its value
            kwargs = {"temperature": float(params.temperature), "top_p": float(params.top_p),
                      "top_k": int(params.top_k) if params.top_k > 0 else int(self.vocab_size or 2**31 - 1)}
        with self._lock:
            if handle.request_id in self._handles:
                raise ServingError(f"request id {handle.request_id!r} is already in flight; give a unique request_id")
            manager = self._manager(kind)
            self._handles[handle.request_id] = (handle, kind)
        stop = [int(t) for t in params.stop_token_ids] or -1  # -1: no EOS (transformers' own convention)
        added = manager.add_request([int(t) for t in prompt_ids], request_id=handle.request_id,
                                    max_new_tokens=params.max_new_tokens, streaming=True, eos_token_id=stop, **kwargs)
        if added is None:  # the manager refused (stopping, or failed): nothing was queued
            with self._lock:
                self._handles.pop(handle.request_id, None)
            raise ServingError(f"backend {self.name!r}: transformers' continuous batching refused the request "
                               f"(its loop is stopping or has failed: {self._fatal(manager)})")
        return handle

    def cancel(self, request_id: str) -> bool:
        """Stop a request now and free its cache blocks; False if it is not in flight."""
        with self._lock:
            entry = self._handles.pop(request_id, None)
        if entry is None:
            return False
        handle, kind = entry
        handle.cancel()
        self._managers[kind].cancel_request(request_id)  # the manager frees its blocks before its next step
        handle.finish("cancelled")
        return True

    def close(self) -> None:
        """Stop the managers (in-flight requests fail with "backend closed") and restore the model's attention."""
        if self._closed.is_set():
            return
        self._closed.set()
        for manager in reversed(list(self._managers.values())):  # the first made restores the attention last
            try:
                manager.stop(block=True, timeout=30, hard_stop=True)
                manager.destroy()
            except Exception:  # noqa: BLE001 - closing must go on for the other manager
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            left, self._handles = list(self._handles.values()), {}
        for handle, _ in left:
            handle.finish("error", f"backend {self.name!r} was closed before the request finished")

    def __enter__(self) -> "StockBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """Requests in flight here, and what transformers' schedulers still hold (active, waiting, owning cache blocks)."""
        out = {"in_flight": len(self._handles), "manager_active": 0, "manager_waiting": 0, "cache_holders": 0}
        for manager in self._managers.values():
            proc = getattr(manager, "batch_processor", None)
            sched = getattr(proc, "scheduler", None)
            if sched is None:
                continue
            out["manager_active"] += len(sched.active_requests)
            out["manager_waiting"] += len(sched.waiting_requests)
            holders = set()  # requests that still own KV cache blocks
            for allocator in getattr(proc.cache, "cache_allocators", {}).values():
                holders.update(getattr(allocator, "block_table", {}))
            out["cache_holders"] += len(holders)
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "transformers continuous batching (ContinuousBatchingManager)",
                "model": type(self.model).__name__, "max_batch": self.max_batch, "max_context": self.max_context,
                "max_batch_tokens": self.max_batch_tokens,
                "attention": getattr(getattr(self.model, "config", None), "_attn_implementation", None)}

    # ------------------------------------------------------------------ managers and their output threads
    def _manager(self, kind: str) -> Any:
        """The manager for greedy or sampling requests, made and started on first use (call under the lock)."""
        manager = self._managers.get(kind)
        if manager is not None:
            return manager
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        if kind == "greedy":
            gen = GenerationConfig(do_sample=False, eos_token_id=-1)
        else:  # non-default values make transformers build the warpers; each request overrides them
            gen = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.5, eos_token_id=-1)
        pages = self.max_batch * math.ceil(self.max_context / _PAGE) + 1
        cb = ContinuousBatchingConfig(page_size=_PAGE, num_blocks=pages, max_batch_tokens=self.max_batch_tokens,
                                      max_requests_per_batch=self.max_batch, per_request_processors=kind == "sample")
        manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        with torch.inference_mode():  # the loop runs in the starting thread's inference mode
            manager.start()
        self._managers[kind] = manager
        thread = threading.Thread(target=self._dispatch, args=(kind, manager), daemon=True,
                                  name=f"optistack-stock-{kind}")
        thread.start()
        self._threads.append(thread)
        return manager

    def _dispatch(self, kind: str, manager: Any) -> None:
        """Move each streamed output onto its handle; cancel the handles that asked; fail all if the loop dies."""
        while not self._closed.is_set():
            self._reap_cancelled(kind, manager)
            if not manager.is_running():
                self._fail_all(kind, f"transformers' continuous batching loop stopped: {self._fatal(manager)}")
                return
            out = manager.get_result(timeout=_POLL_S)
            if out is not None:
                self._deliver(out)

    def _deliver(self, out: Any) -> None:
        entry = self._handles.get(out.request_id)
        if entry is None:  # cancelled (or closed) while this step ran: nothing to deliver
            return
        handle = entry[0]
        for token in out.generated_tokens[len(handle.tokens):]:
            handle.push(token)
        if not out.is_finished():
            return
        with self._lock:
            self._handles.pop(out.request_id, None)
        if out.error is not None:
            handle.finish("error", f"transformers' continuous batching: {out.error}")
        elif handle.tokens and handle.tokens[-1] in handle.params.stop_token_ids:
            handle.finish("stop")
        else:
            handle.finish("length")

    def _reap_cancelled(self, kind: str, manager: Any) -> None:
        asked = [rid for rid, (h, k) in list(self._handles.items()) if k == kind and h.cancelled]
        for rid in asked:
            self.cancel(rid)

    def _fail_all(self, kind: str, why: str) -> None:
        with self._lock:
            mine = [rid for rid, (_, k) in self._handles.items() if k == kind]
            handles = [self._handles.pop(rid)[0] for rid in mine]
        for handle in handles:
            handle.finish("error", why)

    @staticmethod
    def _fatal(manager: Any) -> str:
        error = getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)
        return f"{type(error).__name__}: {error}" if error is not None else "no error recorded"


def _check_supported(params: SamplingParams) -> None:
    """Refuse, naming the field, what transformers' continuous batching cannot honour per request."""
    if params.min_new_tokens > 0:
        raise ServingError(f"min_new_tokens={params.min_new_tokens} is not supported by the stock backend: "
                           "transformers' continuous batching drops its MinNewTokens processor; use 0")
    if params.repetition_penalty != 1.0:
        raise ServingError(f"repetition_penalty={params.repetition_penalty} is not supported by the stock backend: "
                           "transformers' continuous batching drops its repetition-penalty processor; use 1.0")
    if params.do_sample and params.seed is not None:
        raise ServingError(f"seed={params.seed} is not supported by the stock backend: transformers' continuous "
                           "batching samples every request from one shared generator; use seed=None")
