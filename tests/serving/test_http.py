"""The OpenAI-compatible API (optistack.serving.http) over a real backend: answers equal the model's own
greedy generate(), streams equal whole answers, every bad request is one 4xx and the server goes on."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_serving  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from optistack.serving.http import create_app  # noqa: E402
from optistack.serving.simple_backend import SimpleBackend  # noqa: E402

PROMPT = "The class statement defines"


@pytest.fixture(scope="module")
def served():
    tok = tiny_serving.tokenizer()
    model = tiny_serving.model(tok, context=256)
    backend = SimpleBackend(model)
    with TestClient(create_app(backend, tok, "tiny")) as client:
        yield client, tok, model, backend
    backend.close()


def _events(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_health_and_models(served):
    client, *_ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert health["backend"]["name"] == "simple" and health["backend"]["active"] == 0 and health["backend"]["max_context"] == 256
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_greedy_completion_equals_the_models_own_generate(served):
    client, tok, model, _ = served
    ids = tok(PROMPT)["input_ids"]
    want = tiny_serving.greedy(model, ids, 20, eos=tok.eos_token_id)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["text"] == tiny_serving.text_of(tok, want)
    assert choice["finish_reason"] == ("stop" if want[-1] == tok.eos_token_id else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want), "total_tokens": len(ids) + len(want)}
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 20, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == choice["text"]


def test_chat_completion_goes_through_the_chat_template(served):
    client, tok, model, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a class?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = tiny_serving.greedy(model, ids, 15, eos=tok.eos_token_id)
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 15, "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": tiny_serving.text_of(tok, want)}
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(want)


@pytest.mark.parametrize("chat", [False, True])
def test_stream_yields_the_same_text_as_the_whole_answer(served, chat):
    client, *_ = served
    url = "/v1/chat/completions" if chat else "/v1/completions"
    req = {"messages": [{"role": "user", "content": "Write a loop."}]} if chat else {"prompt": PROMPT}
    req |= {"max_tokens": 30, "temperature": 0}
    whole = client.post(url, json=req).json()
    r = client.post(url, json=req | {"stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    usage = events.pop()
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(e["id"] == events[0]["id"] for e in events)
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text == whole["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == whole["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_stop_strings_trim_the_output_whole_and_streamed(served):
    client, tok, model, _ = served
    full = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(5, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    cut = text[:text.index(stop)]
    req = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop, "never appears"]}
    body = client.post("/v1/completions", json=req).json()
    assert body["choices"][0]["text"] == cut and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    events = _events(client.post("/v1/completions", json=req | {"stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == cut and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(served):
    client, *_ = served
    req = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 3}
    a, b = (client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(2))
    assert a == b


BAD = [
    ("/v1/completions", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokns": 5}, 400, "max_tokns", "unknown field 'max_tokns' (valid: max_tokens, model"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt", "'prompt' is required"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "prompt must be a string or a non-empty list of token ids"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer >= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens", "got -3"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "within [0, 2]"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "n must be an integer equal to 1"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt", "context is 256 tokens and the prompt alone is"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 300}, 400, "max_tokens", "lower max_tokens to"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "is not served here"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400,
     "messages[0].tool_calls", "unknown field 'tool_calls'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2},
     400, "max_completion_tokens", "not both"),
]


@pytest.mark.parametrize("url, body, status, param, message", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_each_bad_request_is_one_4xx_and_the_server_goes_on(served, url, body, status, param, message):
    client, *_ = served
    r = client.post(url, content=body) if isinstance(body, bytes) else client.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"] and "\n" not in error["message"]
    ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_fields_turned_off_are_accepted_and_unknown_paths_are_json(served):
    client, *_ = served
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": None, "echo": False,
                                             "presence_penalty": 0, "n": 1, "user": "me"})
    assert r.status_code == 200, r.text
    assert client.get("/v1/nothing").json()["error"]["message"] == "GET /v1/nothing: Not Found"
    assert client.get("/v1/completions").status_code == 405


def test_chat_without_a_template_is_refused(served):
    _, _, model, backend = served
    with TestClient(create_app(backend, tiny_serving.tokenizer(chat=False), "plain")) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "no chat template; use /v1/completions" in r.json()["error"]["message"]


class FailingBackend(SimpleBackend):
    """A SimpleBackend whose decoding fails after one token: how the server answers a backend's error."""

    def _generate(self, handle):
        handle.push(5)
        raise RuntimeError("the decoder broke")


def test_a_backend_error_is_a_500_whole_or_an_error_event_streamed(served):
    _, tok, model, _ = served
    backend = FailingBackend(model)
    try:
        with TestClient(create_app(backend, tok, "tiny")) as client:
            r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "RuntimeError: the decoder broke" in r.json()["error"]["message"]
            events = _events(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True}).text)
            assert "the decoder broke" in events[-1]["error"]["message"]
            assert client.get("/health").json()["requests_in_flight"] == 0
    finally:
        backend.close()
