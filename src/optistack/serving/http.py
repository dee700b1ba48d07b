"""`optistack serve`: an OpenAI-compatible HTTP API over any `Backend`, on Starlette (run by uvicorn).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(docs/serve.md). A request is checked (api_schema.py), tokenized, and submitted to the backend; tokens
come back on the backend's thread and are handed to the event loop with `loop.call_soon_threadsafe`,
detokenized incrementally (detokenize.py) and answered as one JSON body or as server-sent events
ending with `data: [DONE]`. A client that goes away cancels its request, which frees its slot.

`serve(saved_dir, ...)` loads a folder and runs this app under uvicorn (launch.py).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterable

from .api_schema import Answer, GenerationRequest, RequestError, error_body, parse_json, parse_request
from .backend import RequestHandle, SamplingParams, ServingError
from .detokenize import OutputText

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_BODY_BYTES = 8 << 20


def _json(body: Any, status: int = 200) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


class _Run:
    """One request in flight: the backend's tokens, as text pieces on the event loop."""

    def __init__(self, backend: Any, prompt_ids: list[int], params: SamplingParams, output: OutputText) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.output = output
        self.prompt_tokens = len(prompt_ids)
        self.handle: RequestHandle = backend.submit(prompt_ids, params, on_token=self._on_token, on_done=self._on_done)

    def _post(self, item: tuple[str, int]) -> None:  # on the backend's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _on_token(self, handle: RequestHandle, token: int) -> None:
        self._post(("token", token))

    def _on_done(self, handle: RequestHandle) -> None:
        self._post(("done", 0))

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish_reason): finish_reason is None until the last piece; the handle is cancelled on exit
        if the request is still running (a stop string, or the client went away)."""
        try:
            while True:
                kind, token = await self.queue.get()
                if kind == "token":
                    text = self.output.add(token)
                    if self.output.stopped:
                        self.handle.cancel()
                        yield text, "stop"
                        return
                    if text:
                        yield text, None
                    continue
                reason = self.handle.finish_reason
                if reason == "error":
                    raise ServingError(f"the backend failed on this request: {self.handle.error}")
                yield self.output.finish(), {"stop": "stop", "length": "length"}.get(reason or "", "abort")
                return
        finally:
            if not self.handle.done.is_set():
                self.handle.cancel()

    def usage(self) -> dict[str, int]:
        done = self.output.tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}


async def _body(request: Any) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _cancel_on_disconnect(request: Any, handle: RequestHandle) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


class OpenAIServer:
    """The endpoints, over one backend and its tokenizer (see `create_app`)."""

    def __init__(self, backend: Any, tokenizer: Any, model_name: str, stop_token_ids: Iterable[int] | None = None) -> None:
        self.backend, self.tokenizer, self.model_name = backend, tokenizer, model_name
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            stop_token_ids = [] if eos is None else [eos]
        self.stop_token_ids = tuple(sorted({int(t) for t in stop_token_ids}))
        self.vocab_size = len(tokenizer)
        self.created = int(time.time())
        self.in_flight = 0
        self.served = 0

    # ------------------------------------------------------------------ small endpoints
    async def health(self, request: Any) -> Any:
        backend: dict[str, Any] = {"name": getattr(self.backend, "name", type(self.backend).__name__),
                                   "max_context": getattr(self.backend, "max_context", None)}
        stats = getattr(self.backend, "stats", None)
        if callable(stats):
            backend.update(stats())
        return _json({"status": "ok", "model": self.model_name, "backend": backend,
                      "requests_in_flight": self.in_flight, "requests_served": self.served})

    async def models(self, request: Any) -> Any:
        return _json({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                  "owned_by": "optistack", "max_model_len": self.backend.max_context}]})

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Any) -> Any:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Any) -> Any:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Any, chat: bool) -> Any:
        try:
            req = parse_request(parse_json(await _body(request)), chat)
            if req.model is not None and req.model != self.model_name:
                raise RequestError(f"model '{req.model}' is not served here; this server serves '{self.model_name}'",
                                   "model", status=404)
            prompt_ids = self._chat_ids(req.messages) if chat else self._prompt_ids(req.prompt)
            params = self._params(req, len(prompt_ids), chat)
            output = OutputText(self.tokenizer, req.stop, hidden_ids=self.stop_token_ids)
            try:
                run = _Run(self.backend, prompt_ids, params, output)
            except ServingError as exc:  # the backend's own checks (an option it does not take, closed)
                raise RequestError(str(exc)) from None
        except RequestError as exc:
            return _json(exc.body(), exc.status)
        answer = Answer(self.model_name, chat)
        if req.stream:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._events(request, run, answer, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, run, answer)

    def _prompt_ids(self, prompt: str | list[int] | None) -> list[int]:
        if isinstance(prompt, list):
            bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"prompt token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}", "prompt")
            return list(prompt)
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", "prompt")
        return ids

    def _chat_ids(self, messages: list[dict[str, str]] | None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"the model '{self.model_name}' has no chat template; use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles that must alternate, ...)
            raise RequestError(f"the chat template refused these messages: {' '.join(str(exc).split())[:200]}",
                               "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _params(self, req: GenerationRequest, prompt_len: int, chat: bool) -> SamplingParams:
        context = self.backend.max_context
        left = context - prompt_len
        where = "messages" if chat else "prompt"
        if left < 1:
            raise RequestError(f"this model's context is {context} tokens and the {where} alone is {prompt_len}: "
                               "shorten it", where)
        max_new = req.max_tokens
        if max_new is None:
            max_new = left if chat else min(DEFAULT_COMPLETION_TOKENS, left)
        elif prompt_len + max_new > context:
            raise RequestError(f"this model's context is {context} tokens; the {where} ({prompt_len} tokens) + "
                               f"max_tokens ({max_new}) = {prompt_len + max_new}: lower max_tokens to {left} or less",
                               "max_tokens")
        greedy = req.temperature == 0
        return SamplingParams(max_new_tokens=max_new, do_sample=not greedy, temperature=1.0 if greedy else req.temperature,
                              top_k=req.top_k, top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed,
                              stop_token_ids=self.stop_token_ids)

    async def _whole(self, request: Any, run: _Run, answer: Answer) -> Any:
        self.in_flight += 1
        watch = asyncio.ensure_future(_cancel_on_disconnect(request, run.handle))
        try:
            text, reason = [], None
            async for piece, reason in run.pieces():
                text.append(piece)
            return _json(answer.whole("".join(text), reason, run.usage()))
        except ServingError as exc:
            return _json(error_body(str(exc), None, "server_error"), 500)
        finally:
            watch.cancel()
            self.in_flight -= 1
            self.served += 1

    async def _events(self, request: Any, run: _Run, answer: Answer, include_usage: bool) -> AsyncIterator[str]:
        self.in_flight += 1
        watch = asyncio.ensure_future(_cancel_on_disconnect(request, run.handle))
        try:
            if answer.chat:
                yield answer.event({"role": "assistant", "content": ""}, None, include_usage)
            async for piece, reason in run.pieces():
                if piece or reason:
                    yield answer.event(piece, reason, include_usage)
            if include_usage:
                yield answer.sse({**answer.head(chunk=True), "choices": [], "usage": run.usage()})
        except ServingError as exc:
            yield answer.sse(error_body(str(exc), None, "server_error"))
        finally:
            watch.cancel()
            self.in_flight -= 1
            self.served += 1
        yield "data: [DONE]\n\n"


def create_app(backend: Any, tokenizer: Any, model_name: str, *, stop_token_ids: Iterable[int] | None = None) -> Any:
    """The Starlette app serving `backend` (a `serving.backend.Backend`) with `tokenizer`'s text and chat template.

    `stop_token_ids` end a request (default: the tokenizer's eos token); they count as completion tokens but
    are never shown. The app does not own the backend: close it yourself when the app is done.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    server = OpenAIServer(backend, tokenizer, model_name, stop_token_ids)

    async def http_error(request: Any, exc: HTTPException) -> Any:
        return _json(error_body(f"{request.method} {request.url.path}: {exc.detail}"), exc.status_code)

    async def server_error(request: Any, exc: Exception) -> Any:  # a bug, answered in OpenAI's shape too
        return _json(error_body(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", None, "server_error"), 500)

    routes = [Route("/health", server.health, methods=["GET"]), Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app


def serve(saved_dir: Any, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, **options: Any) -> None:
    """Load `saved_dir` (a `RunResult.save` folder or a Hugging Face folder) and serve it until interrupted;
    `options`: max_context, threads, tokenizer, model_name, backend, log_level (see `launch.serve`)."""
    from .launch import serve as _serve

    _serve(saved_dir, host=host, port=port, max_batch=max_batch, **options)
