"""The API on a live uvicorn over loopback: a real SSE stream, and a client that goes away (mid-stream or
while waiting for a whole answer) cancels its request and frees the backend."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_serving  # noqa: E402

from optistack.serving.http import create_app  # noqa: E402
from optistack.serving.launch import listen  # noqa: E402
from optistack.serving.simple_backend import SimpleBackend  # noqa: E402

LONG = 3500  # tokens: far more than the test waits for


RecordingBackend = tiny_serving.recording(SimpleBackend)


@pytest.fixture(scope="module")
def live():
    tok = tiny_serving.tokenizer()
    backend = RecordingBackend(tiny_serving.model(tok, context=4096))
    sock = listen("127.0.0.1", 0)
    app = create_app(backend, tok, "tiny", stop_token_ids=[])  # no eos: a long request really runs long
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield url, backend
    server.should_exit = True
    thread.join(10)
    backend.close()
    sock.close()


def _until(check, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _freed(url: str, backend: RecordingBackend) -> None:
    handle = backend.handles[-1]
    _until(lambda: handle.done.is_set())
    assert handle.finish_reason == "cancelled" and len(handle.tokens) < LONG
    _until(lambda: backend.active == 0)
    _until(lambda: httpx.get(f"{url}/health").json()["requests_in_flight"] == 0)
    health = httpx.get(f"{url}/health").json()
    assert health["backend"]["active"] == 0 and health["backend"]["queued"] == 0


def test_live_stream_matches_the_whole_answer(live):
    url, _ = live
    req = {"prompt": "Lists are mutable", "max_tokens": 25, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=req, timeout=30).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", json=req | {"stream": True}, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert "".join(pieces) == whole


def test_client_that_disconnects_mid_stream_frees_its_slot(live):
    url, backend = live
    req = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": LONG, "temperature": 0,
           "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=30) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                break  # leaving the block closes the connection
    _freed(url, backend)
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_client_that_gives_up_on_a_whole_answer_frees_its_slot(live):
    url, backend = live
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": LONG, "temperature": 0}, timeout=0.5)
    _freed(url, backend)
