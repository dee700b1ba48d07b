"""`SimpleBackend`: one request at a time through the model's own `generate()`, on a worker thread.

The fallback for models no batching backend serves: any causal LM with a `generate()` (a plain
transformers model, or one whose decoding a pass changed: the strategy it installed serves `generate`
here too). It keeps the whole `Backend` contract: `submit` checks and queues at once, tokens stream back
from the worker thread through a `generate` streamer, a stop token ends a request with "stop",
`max_new_tokens` with "length", `cancel` with "cancelled" (checked before a queued request starts and
between decode steps, by a stopping criterion), an exception in `generate` with "error", `close` with
"error" for the running and the queued ones. It is slow under load: requests wait in a FIFO queue while
one decodes (`optistack serve --backend simple`; `serving.backends_for` picks it for models no batching
backend serves).

Sampling follows `SamplingParams` (greedy unless `do_sample`); `seed` seeds torch's global generator
just before the request runs, which is reproducible here because only this thread decodes.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable

import torch

from .backend import RequestHandle, SamplingParams, ServingError, check_request


def _streamer_and_stopper(handle: RequestHandle) -> tuple[Any, Any]:
    from transformers.generation.stopping_criteria import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class PushStreamer(BaseStreamer):
        """generate() calls put(prompt ids) once, then put(new ids) after every step."""

        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                if handle.cancelled or len(handle.tokens) >= handle.params.max_new_tokens:
                    return
                handle.push(token)

        def end(self) -> None:
            pass

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), handle.cancelled, dtype=torch.bool, device=input_ids.device)

    return PushStreamer(), Cancelled()


class SimpleBackend:
    """Serves `model` (a causal LM with `generate()`) one request at a time; see the module docstring."""

    name = "simple"

    def __init__(self, model: Any, max_context: int | None = None) -> None:
        if not callable(getattr(model, "generate", None)):
            raise ServingError(f"SimpleBackend needs a causal LM with generate(); a {type(model).__name__} has none")
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if max_context is None:
            if not isinstance(limit, int) or limit < 2:
                raise ServingError("the model's config has no max_position_embeddings: give max_context")
            max_context = limit
        if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 2:
            raise ServingError(f"max_context must be an integer >= 2; got {max_context!r}")
        if isinstance(limit, int) and max_context > limit:
            raise ServingError(f"max_context {max_context} exceeds the model's max_position_embeddings ({limit})")
        self.model = model
        self.max_context = max_context
        self.vocab_size = getattr(config, "vocab_size", None)
        self.served = 0
        self._running: RequestHandle | None = None
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="optistack-simple-backend", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the contract
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[RequestHandle, int], None] | None = None,
               on_done: Callable[[RequestHandle], None] | None = None) -> RequestHandle:
        check_request(self, prompt_ids, params, self.vocab_size)
        handle = RequestHandle(prompt_ids, params, request_id, on_token=on_token, on_done=on_done)
        with self._lock:
            if self._closed:
                raise ServingError("this backend is closed")
            self._queue.put(handle)
        return handle

    def close(self) -> None:
        """Stop the worker: the running request and the queued ones end with "error" (backend closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        while self._thread.is_alive():  # stop whatever runs now, at its next step
            running = self._running
            if running is not None:
                running.cancel()
            self._thread.join(0.05)
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.finish("error", "the backend was closed before this request ran")

    @property
    def active(self) -> int:
        """Requests decoding now (0 or 1)."""
        return 0 if self._running is None else 1

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        return {"active": self.active, "queued": self.queued, "served": self.served, "max_batch": 1,
                "closed": self._closed}

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            if handle.cancelled:
                handle.finish("cancelled")
                continue
            if self._closed:
                handle.finish("error", "the backend was closed before this request ran")
                continue
            self._running = handle
            try:
                reason = self._generate(handle)
            except Exception as exc:  # the request fails, the backend goes on
                handle.finish("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            else:
                if reason == "cancelled" and self._closed:
                    handle.finish("error", "the backend was closed while this request ran")
                else:
                    handle.finish(reason)
            finally:
                self._running = None
                self.served += 1

    def _generate(self, handle: RequestHandle) -> str:
        from transformers.generation.stopping_criteria import StoppingCriteriaList

        p = handle.params
        config = copy.deepcopy(self.model.generation_config)
        config.eos_token_id = list(p.stop_token_ids)  # [] (not None, which means the model's eos): no stop token
        config.max_length, config.max_new_tokens, config.min_new_tokens = None, p.max_new_tokens, p.min_new_tokens
        config.do_sample = p.do_sample
        config.temperature, config.top_k, config.top_p = (p.temperature, p.top_k or None, p.top_p) if p.do_sample \
            else (None, None, None)
        config.repetition_penalty = p.repetition_penalty
        config.stop_strings = None  # the server applies stop strings to the text; here only stop_token_ids end
        if config.pad_token_id is None:
            config.pad_token_id = p.stop_token_ids[0] if p.stop_token_ids else 0
        streamer, stopper = _streamer_and_stopper(handle)
        if p.seed is not None:
            torch.manual_seed(p.seed)
        ids = torch.tensor([handle.prompt_ids], dtype=torch.long)
        device = getattr(self.model, "device", None)
        if isinstance(device, torch.device):
            ids = ids.to(device)
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                            streamer=streamer, stopping_criteria=StoppingCriteriaList([stopper]))
        if handle.cancelled:
            return "cancelled"
        if handle.tokens and handle.tokens[-1] in p.stop_token_ids:
            return "stop"
        return "length"
