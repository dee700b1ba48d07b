"""The serving contract: a backend takes requests (prompt ids + sampling parameters) and streams tokens back.

Every serving front end (the LoadGen harness, the HTTP server, the demo) speaks only to `Backend`; every
backend (continuous batching on the C++ engine, transformers' own continuous batching, a peer) keeps it.

A request's life: `submit` returns a `RequestHandle` at once; tokens arrive on the backend's own thread,
each appended to `handle.tokens` (with its time in `handle.token_times`) and passed to `on_token`; at the
end `finish_reason` is set ("length", "stop", "cancelled" or "error" with `error` saying why), `on_done`
runs, and `done` is set. Callbacks run on the backend's thread: they must be quick and must not call
back into the backend except `cancel`. `handle.stream()` yields the tokens from any other thread.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from ..core.errors import OptistackError

FINISH_REASONS = ("length", "stop", "cancelled", "error")


class ServingError(OptistackError, ValueError):
    """A request or a backend option is not valid: one line saying what and what would be."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. Greedy unless `do_sample`; `seed` makes sampling reproducible per request."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # any of these ends the request (finish_reason "stop"), kept in tokens

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ServingError(what)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}")
        need(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens must be within 0..max_new_tokens ({self.max_new_tokens}); got {self.min_new_tokens!r}")
        need(self.temperature > 0, f"temperature must be > 0; got {self.temperature!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0; got {self.top_k!r}")
        need(0 < self.top_p <= 1, f"top_p must be within (0, 1]; got {self.top_p!r}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0; got {self.repetition_penalty!r}")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be token ids >= 0; got {self.stop_token_ids!r}")


_ids = itertools.count()


class RequestHandle:
    """One submitted request, filled in by the backend's thread (see the module docstring)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 on_token: Callable[["RequestHandle", int], None] | None = None,
                 on_done: Callable[["RequestHandle"], None] | None = None) -> None:
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.tokens: list[int] = []
        self.token_times: list[float] = []  # time.perf_counter() when each token was produced
        self.submitted_at = time.perf_counter()
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self._on_token, self._on_done = on_token, on_done
        self._cancel = threading.Event()
        self._cond = threading.Condition()

    # ---------------------------------------------------------------- read by anyone
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the backend to stop this request; it frees the request's slot at its next step."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.submitted_at if self.token_times else None

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Tokens as they arrive (blocking), ending when the request ends; raises ServingError on an error."""
        seen = 0
        while True:
            with self._cond:
                while seen >= len(self.tokens) and not self.done.is_set():
                    if not self._cond.wait(timeout):
                        raise ServingError(f"request {self.request_id}: no token within {timeout} s")
                new, finished = self.tokens[seen:], self.done.is_set()
            yield from new
            seen += len(new)
            if finished and seen >= len(self.tokens):
                if self.finish_reason == "error":
                    raise ServingError(f"request {self.request_id} failed: {self.error}")
                return

    # ---------------------------------------------------------------- called by the backend's thread
    def push(self, token: int, at: float | None = None) -> None:
        with self._cond:
            self.tokens.append(int(token))
            self.token_times.append(time.perf_counter() if at is None else at)
            self._cond.notify_all()
        if self._on_token is not None:
            self._on_token(self, int(token))

    def finish(self, reason: str, error: str | None = None) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}; got {reason!r}")
        with self._cond:
            if self.done.is_set():
                return
            self.finish_reason, self.error = reason, error
            self.done.set()
            self._cond.notify_all()
        if self._on_done is not None:
            self._on_done(self)


@runtime_checkable
class Backend(Protocol):
    """What the LoadGen harness and the HTTP server need of a backend.

    `max_context`: the most tokens (prompt + new) one request may hold; `submit` refuses longer ones with
    a ServingError before queueing. `close()` ends the backend's thread and fails what is still queued.
    """

    name: str
    max_context: int

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[RequestHandle, int], None] | None = None,
               on_done: Callable[[RequestHandle], None] | None = None) -> RequestHandle: ...

    def close(self) -> None: ...


def check_request(backend: Any, prompt_ids: list[int], params: SamplingParams, vocab_size: int | None = None) -> None:
    """The checks every backend makes before queueing (one ServingError naming what is wrong)."""
    if not isinstance(params, SamplingParams):
        raise ServingError(f"params must be a SamplingParams; got {type(params).__name__}")
    if not prompt_ids:
        raise ServingError("the prompt is empty: give at least one token id")
    if vocab_size is not None and any(not 0 <= int(t) < vocab_size for t in prompt_ids):
        bad = next(int(t) for t in prompt_ids if not 0 <= int(t) < vocab_size)
        raise ServingError(f"prompt token id {bad} is outside the vocabulary 0..{vocab_size - 1}")
    need = len(prompt_ids) + params.max_new_tokens
    if need > backend.max_context:
        raise ServingError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {need} "
                           f"exceeds this backend's context of {backend.max_context} tokens")
