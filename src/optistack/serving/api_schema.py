"""The OpenAI request bodies `optistack serve` accepts, checked field by field before anything is queued,
and the response and chunk shapes it answers with (`Answer`).

Every refusal is one `RequestError` naming the field (`param`) and what would be valid; the server
answers it as OpenAI does: `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`.
Unknown fields are refused by name with the list of valid ones; fields OpenAI defines that this server
does not implement (logprobs, penalties, tools, ...) are accepted only with their "off" value (null,
false or 0), so clients that always send them still work.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Any, Callable

from .backend import ServingError

MAX_STOP = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_FIELDS = ("role", "content", "name")


class RequestError(ServingError):
    """A request the server refuses: HTTP `status`, the offending field in `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(name: str, low: int, high: int | None = None, what: str = "") -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or v < low or (high is not None and v > high):
            span = f">= {low}" if high is None else (f"equal to {low}" if low == high else f"within {low}..{high}")
            raise RequestError(f"{name} must be an integer {span}{what}; got {_short(v)}", name)
        return v
    return check


def _number(name: str, low: float, high: float, low_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        ok = type(v) in (int, float) and math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
        if not ok:
            raise RequestError(f"{name} must be a number within {'(' if low_open else '['}{low:g}, {high:g}]; "
                               f"got {_short(v)}", name)
        return float(v)
    return check


def _typed(name: str, kind: type, label: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if type(v) is not kind:
            raise RequestError(f"{name} must be {label}; got {_short(v)}", name)
        return v
    return check


def _prompt(v: Any) -> str | list[int]:
    if type(v) is list and len(v) == 1 and type(v[0]) in (str, list):
        v = v[0]  # a batch of one
    if type(v) is str:
        return v
    if type(v) is list and v and all(type(t) is int for t in v):
        return v
    raise RequestError("prompt must be a string or a non-empty list of token ids (one prompt per request); "
                       f"got {_short(v)}", "prompt")


def _stop(v: Any) -> list[str]:
    stops = [v] if type(v) is str else v
    if type(stops) is not list or not all(type(s) is str and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of them; got {_short(v)}", "stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop takes at most {MAX_STOP} strings; got {len(stops)}", "stop")
    return stops


def _stream_options(v: Any) -> bool:
    if type(v) is not dict or set(v) - {"include_usage"} or type(v.get("include_usage", False)) is not bool:
        raise RequestError(f'stream_options must be {{"include_usage": true|false}}; got {_short(v)}', "stream_options")
    return v.get("include_usage", False)


def _content(v: Any, where: str) -> str:
    if type(v) is str:
        return v
    if type(v) is list and all(type(p) is dict and p.get("type") == "text" and type(p.get("text")) is str
                               and set(p) == {"type", "text"} for p in v):
        return "".join(p["text"] for p in v)
    raise RequestError(f'{where} must be a string or a list of {{"type": "text", "text": ...}} parts '
                       f"(this server takes text only); got {_short(v)}", where)


def _messages(v: Any) -> list[dict[str, str]]:
    if type(v) is not list or not v:
        raise RequestError(f"messages must be a non-empty list of {{role, content}} objects; got {_short(v)}", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if type(m) is not dict:
            raise RequestError(f"{where} must be an object with role and content; got {_short(m)}", where)
        unknown = sorted(set(m) - set(_MESSAGE_FIELDS))
        if unknown:
            raise RequestError(f"{where}: unknown field '{unknown[0]}' (valid: {', '.join(_MESSAGE_FIELDS)})",
                               f"{where}.{unknown[0]}")
        if m.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {_short(m.get('role'))}",
                               f"{where}.role")
        if "content" not in m:
            raise RequestError(f"{where}.content is missing", f"{where}.content")
        msg = {"role": m["role"], "content": _content(m["content"], f"{where}.content")}
        if "name" in m:
            msg["name"] = _typed(f"{where}.name", str, "a string")(m["name"])
        out.append(msg)
    return out


_COMMON: dict[str, Callable[[Any], Any]] = {
    "model": _typed("model", str, "a string"),
    "temperature": _number("temperature", 0, 2),
    "top_p": _number("top_p", 0, 1, low_open=True),
    "top_k": _integer("top_k", 0, what=" (0: off)"),
    "seed": _integer("seed", 0, 2**63 - 1),
    "stop": _stop,
    "n": _integer("n", 1, 1, what=" (one choice per request)"),
    "stream": _typed("stream", bool, "true or false"),
    "stream_options": _stream_options,
    "repetition_penalty": _number("repetition_penalty", 0, 10, low_open=True),
    "user": _typed("user", str, "a string"),
}
COMPLETION_FIELDS = {**_COMMON, "prompt": _prompt, "max_tokens": _integer("max_tokens", 1)}
CHAT_FIELDS = {**_COMMON, "messages": _messages, "max_tokens": _integer("max_tokens", 1),
               "max_completion_tokens": _integer("max_completion_tokens", 1)}
# OpenAI fields this server does not implement, accepted only with the value that turns them off.
_OFF = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "logit_bias": (None, {}),
        "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
        "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
        "response_format": (None, {"type": "text"}), "functions": (None, []), "function_call": (None, "none")}
_COMPLETION_OFF = ("logprobs", "echo", "best_of", "logit_bias", "suffix", "presence_penalty", "frequency_penalty")
_CHAT_OFF = ("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "tools",
             "tool_choice", "parallel_tool_calls", "response_format", "functions", "function_call")


@dataclasses.dataclass
class GenerationRequest:
    """One checked request. `prompt` (completions) or `messages` (chat) is set; `max_tokens` None: default."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    repetition_penalty: float = 1.0


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the request body is not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if type(body) is not dict:
        raise RequestError(f"the request body must be a JSON object; got {type(body).__name__}")
    return body


def parse_request(body: dict[str, Any], chat: bool) -> GenerationRequest:
    fields, off = (CHAT_FIELDS, _CHAT_OFF) if chat else (COMPLETION_FIELDS, _COMPLETION_OFF)
    required = "messages" if chat else "prompt"
    for name in body:
        if name in fields:
            continue
        if name in off:
            if any(type(body[name]) is type(ok) and body[name] == ok for ok in _OFF[name] if ok is not None) \
                    or body[name] is None:
                continue
            raise RequestError(f"'{name}' is not supported by this server (leave it out, or null)", name)
        raise RequestError(f"unknown field '{name}' (valid: {', '.join(sorted(fields))})", name)
    if required not in body:
        raise RequestError(f"'{required}' is required", required)
    values = {k: fields[k](v) for k, v in body.items() if k in fields and (v is not None or k == required)}
    if chat and "max_tokens" in values and "max_completion_tokens" in values:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    if "stream_options" in values and not values.get("stream", False):
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    out = GenerationRequest()
    out.prompt, out.messages = values.pop("prompt", None), values.pop("messages", None)
    out.max_tokens = values.pop("max_completion_tokens", values.pop("max_tokens", None))
    out.include_usage = values.pop("stream_options", False)
    values.pop("n", None), values.pop("user", None)
    for k, v in values.items():
        setattr(out, k, v)
    return out


class Answer:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self.head(), "choices": [choice], "usage": usage}

    def event(self, piece: Any, reason: str | None, include_usage: bool) -> str:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = piece if isinstance(piece, dict) else ({"content": piece} if piece else {})
        else:
            choice["text"] = piece
        body = {**self.head(chunk=True), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return self.sse(body)

    @staticmethod
    def sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
