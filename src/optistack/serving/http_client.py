"""`HttpBackend`: the `Backend` contract over HTTP, against any OpenAI-compatible server (`optistack serve`, vLLM, ...),
so the LoadGen harness (or anything that speaks `Backend`) can load a server it does not run in process.

`submit` POSTs `/v1/completions` with the prompt as token ids, `stream: true`, `stream_options: {"include_usage":
true}`, max_tokens, temperature (0: greedy), top_p and seed, and reads the server-sent events. One asyncio loop
on one thread (`httpx.AsyncClient`, no connection cap) serves every request: a load test holds as many streams
open as the server has requests in flight, and a thread per stream (or a pool that queues them) would add the
client's own waiting to the latencies. Callbacks (`on_token`, `on_done`) run on that thread.

Tokens: OpenAI's stream carries text, not token ids. Each event with non-empty text is one `push`, timed when
its line arrived; `handle.pieces` keeps the text (`handle.text`: the completion), and `handle.tokens` holds
positions 0, 1, 2, ..., not vocabulary ids (our server refuses `logprobs`, which names tokens by text anyway).
At the end the count becomes `usage.completion_tokens`: missing entries are pushed at the arrival of the event
carrying `finish_reason`, extra ones (a server that splits a token's text) dropped from the middle. So
`len(handle.tokens)`, the n_tokens the harness reports to LoadGen, is the server's count (without a usage
event: the number of text events); TTFT = first text event (or the finish event, if none had text) - submit;
TPOT = (last token - first token) / (completion_tokens - 1), MLPerf's definition on the server's count. Both
include the HTTP request, the server's parsing and detokenizing, and the SSE transport. `optistack serve` sends
one event per token, except that a token ending in an incomplete UTF-8 character is held back until the
character completes (it arrives with a later token: a held-back first token makes TTFT late by that wait),
and eos / special tokens have no text (counted in usage, never sent).

Errors end the request with finish_reason "error": a non-200 answer ("HTTP <status>: <the server's message>",
from OpenAI's `{"error": {"message"}}` or the body's first line), an error event, a stream that ends without a
finish_reason or with one other than stop/length, no connection, no byte for `timeout_s`. `cancel` closes the
stream (the server takes the disconnect as a cancel and frees the slot): "cancelled". What OpenAI's API cannot
say (stop_token_ids, min_new_tokens, repetition_penalty, top_k) is refused at `submit`, naming the field; the
server's own stop tokens (its eos) end a request "stop". Proxy and SSL environment variables are not read.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from typing import Any, Callable

from .backend import RequestHandle, SamplingParams, ServingError, check_request

try:
    import httpx
except ImportError:  # pragma: no cover - in the `serve` extra
    raise ServingError("HttpBackend needs httpx: pip install 'optistack[serve]'") from None


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _message(raw: bytes) -> str:
    """The server's error message: OpenAI's {"error": {"message"}}, other common shapes, or the body's first line."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if isinstance(error, str) and error.strip():
            return _one_line(error)
    lines = raw.decode("utf-8", "replace").strip().splitlines()
    return _one_line(lines[0]) if lines else "(empty body)"


def _check_expressible(p: SamplingParams) -> None:
    """Refuse, naming the field, what OpenAI's completions API has no field for."""
    for field, value, off, why in (
            ("stop_token_ids", p.stop_token_ids, (), "the server applies its own stop tokens (its eos)"),
            ("min_new_tokens", p.min_new_tokens, 0, "OpenAI's API has no such field"),
            ("repetition_penalty", p.repetition_penalty, 1.0, "OpenAI's API has no such field"),
            ("top_k", p.top_k, 0, "OpenAI's API has no such field")):
        if value != off:
            raise ServingError(f"{field}={value!r} cannot be sent to an OpenAI-compatible server ({why}); use {off!r}")


class HttpRequestHandle(RequestHandle):
    """A request to a server: `tokens` are positions (see the module docstring), `pieces` the streamed text,
    `usage` the server's usage event (None until it arrives), `status` the HTTP status."""

    def __init__(self, backend: "HttpBackend", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pieces: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.status: int | None = None
        self._backend = backend
        self._task: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def cancel(self) -> None:
        """End the request now: the stream is closed, which the server takes as a cancel."""
        super().cancel()
        self._backend._stop(self)


class HttpBackend:
    """The `Backend` contract over an OpenAI-compatible server at `base_url` (with or without the trailing /v1).

    `model_name`: the model to ask for (None: the first that `GET /v1/models` lists); `max_context`: the most
    tokens (prompt + new) a request may hold, checked at `submit` as every backend does (give the server's);
    `timeout_s`: the longest the server may stay silent (connecting, or between two bytes of a stream);
    `api_key`: sent as a bearer token. The server must answer `GET /v1/models` when the backend is made.
    """

    def __init__(self, base_url: str, model_name: str | None = None, *, max_context: int,
                 timeout_s: float = 600.0, api_key: str | None = None) -> None:
        if not (isinstance(base_url, str) and base_url.startswith(("http://", "https://"))):
            raise ServingError(f"base_url must be an http:// or https:// URL; got {base_url!r}")
        if not (isinstance(max_context, int) and not isinstance(max_context, bool) and max_context >= 2):
            raise ServingError(f"max_context must be an integer >= 2; got {max_context!r}")
        ok = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and math.isfinite(timeout_s)
        if not (ok and timeout_s > 0):
            raise ServingError(f"timeout_s must be a number > 0; got {timeout_s!r}")
        if model_name is not None and not (isinstance(model_name, str) and model_name):
            raise ServingError(f"model_name must be a non-empty string or None; got {model_name!r}")
        root = base_url.rstrip("/")
        self.base_url = root[:-3] if root.endswith("/v1") else root
        self.max_context, self.timeout_s = max_context, float(timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.models = self._list_models(headers)
        ids = [m.get("id") for m in self.models]
        if model_name is None:
            model_name = ids[0]
        elif model_name not in ids:
            raise ServingError(f"model {model_name!r} is not served at {self.base_url}; it serves: {', '.join(map(str, ids))}")
        self.model_name = model_name
        self.name = f"http {model_name} @ {self.base_url}"
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s, trust_env=False,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._open: set[HttpRequestHandle] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="optistack-http-client", daemon=True)
        self._thread.start()

    def _list_models(self, headers: dict[str, str]) -> list[dict[str, Any]]:
        url = f"{self.base_url}/v1/models"
        try:
            r = httpx.get(url, headers=headers, timeout=min(self.timeout_s, 30.0), trust_env=False)
        except httpx.HTTPError as exc:
            raise ServingError(f"cannot reach the server at {url}: {type(exc).__name__}: {_one_line(exc)}") from None
        if r.status_code != 200:
            raise ServingError(f"GET {url} answered HTTP {r.status_code}: {_message(r.content)}")
        try:
            data = r.json()["data"]
        except (ValueError, KeyError, TypeError):
            data = None
        if not (isinstance(data, list) and data and all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data)):
            raise ServingError(f"GET {url} did not list any model in OpenAI's shape "
                               f"({{\"data\": [{{\"id\": ...}}]}}): {_message(r.content)}")
        return data

    # ------------------------------------------------------------------ the contract
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[RequestHandle, int], None] | None = None,
               on_done: Callable[[RequestHandle], None] | None = None) -> HttpRequestHandle:
        check_request(self, prompt_ids, params)
        _check_expressible(params)
        body: dict[str, Any] = {"model": self.model_name, "prompt": [int(t) for t in prompt_ids],
                                "max_tokens": params.max_new_tokens, "stream": True,
                                "stream_options": {"include_usage": True},
                                "temperature": float(params.temperature) if params.do_sample else 0.0,
                                "top_p": float(params.top_p)}
        if params.seed is not None:
            body["seed"] = params.seed
        handle = HttpRequestHandle(self, prompt_ids, params, request_id, on_token=on_token, on_done=on_done)
        with self._lock:
            if self._closed:
                raise ServingError(f"backend {self.name!r} is closed; make a new one")
            self._open.add(handle)
        asyncio.run_coroutine_threadsafe(self._run(handle, body), self._loop)
        return handle

    def close(self) -> None:
        """Close every open stream (those requests end "error": backend closed), then the connections and the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = list(self._open)
        for handle in left:
            self._stop(handle)
        for handle in left:
            handle.wait(10)
        try:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
        for handle in left:
            handle.finish("error", f"backend {self.name!r} was closed while this request ran")

    def __enter__(self) -> "HttpBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Requests whose stream is open (or about to be)."""
        return len(self._open)

    def describe(self) -> dict[str, Any]:
        served = next((m for m in self.models if m.get("id") == self.model_name), {})
        return {"name": self.name, "kind": "OpenAI-compatible server over HTTP (/v1/completions, SSE)",
                "url": self.base_url, "model": self.model_name, "max_context": self.max_context,
                "server_max_model_len": served.get("max_model_len")}

    # ------------------------------------------------------------------ the event loop's side
    def _stop(self, handle: HttpRequestHandle) -> None:
        def stop() -> None:
            if handle._task is not None and not handle._task.done():
                handle._task.cancel()
        try:
            self._loop.call_soon_threadsafe(stop)
        except RuntimeError:  # the loop is closed: the request has ended already
            pass

    async def _run(self, handle: HttpRequestHandle, body: dict[str, Any]) -> None:
        handle._task = asyncio.current_task()
        reason, error = "error", "the request ended without an answer"
        try:
            if handle.cancelled or self._closed:  # stopped before its task ran
                raise asyncio.CancelledError
            reason, error = await self._stream(handle, body)
        except asyncio.CancelledError:
            reason, error = ("cancelled", None) if handle.cancelled else \
                ("error", f"backend {self.name!r} was closed while this request ran")
        except httpx.TimeoutException as exc:
            reason, error = "error", f"the server sent nothing for timeout_s={self.timeout_s:g} s ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            reason, error = "error", f"{type(exc).__name__}: {_one_line(exc) or 'the connection failed'}"
        except Exception as exc:  # noqa: BLE001 - a malformed stream (or a callback that raised) fails this request only
            reason, error = "error", f"{type(exc).__name__}: {_one_line(exc)}"
        finally:
            with self._lock:
                self._open.discard(handle)
            handle.finish(reason, error)

    async def _stream(self, handle: HttpRequestHandle, body: dict[str, Any]) -> tuple[str, str | None]:
        async with self._client.stream("POST", "/v1/completions", json=body) as resp:
            handle.status = resp.status_code
            if resp.status_code != 200:
                return "error", f"HTTP {resp.status_code}: {_message(await resp.aread())}"
            kind = resp.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                return "error", f"expected server-sent events (text/event-stream); the server answered {kind or 'no type'}"
            finish, finish_at, at = None, 0.0, 0.0
            data: list[str] = []
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    if not data:
                        at = time.perf_counter()  # the event's time: when its first line arrived
                    data.append(line[5:].removeprefix(" "))
                    continue
                if line or not data:  # a comment, another field, or a blank line between events
                    continue
                text, data = "\n".join(data), []
                if text.strip() == "[DONE]":
                    break
                event = json.loads(text)
                if isinstance(event.get("error"), (dict, str)):
                    return "error", f"the server failed the request: {_message(text.encode())}"
                if isinstance(event.get("usage"), dict):
                    handle.usage = event["usage"]
                for choice in event.get("choices") or []:
                    piece = choice.get("text") or ""
                    if piece:
                        handle.pieces.append(piece)
                        handle.push(len(handle.tokens), at=at)
                    if choice.get("finish_reason"):
                        finish, finish_at = choice["finish_reason"], at
        if finish is None:
            return "error", "the stream ended before the server gave a finish_reason"
        self._reconcile(handle, finish_at)
        if finish in ("stop", "length"):
            return finish, None
        return "error", f"the server ended the request with finish_reason {finish!r}"

    @staticmethod
    def _reconcile(handle: HttpRequestHandle, end_at: float) -> None:
        """Make len(tokens) the server's usage.completion_tokens (see the module docstring)."""
        n = (handle.usage or {}).get("completion_tokens")
        if not isinstance(n, int) or n < 0:
            return
        while len(handle.tokens) < n:
            handle.push(len(handle.tokens), at=end_at)
        if len(handle.tokens) > n:  # keep the first n - 1 times and the last
            with handle._cond:
                handle.token_times[:] = (handle.token_times[:n - 1] + handle.token_times[-1:]) if n else []
                handle.tokens[:] = list(range(n))
