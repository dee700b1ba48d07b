"""The LoadGen harness driving `optistack serve` over loopback: HttpBackend against a live uvicorn serving a tiny
random Llama through the backend `serving.backends_for` gives it (transformers' continuous batching). A bounded
Offline run and one Server run answer every sample with the server's token counts; the streamed greedy text is
the non-streamed answer; the server's 400 reaches the handle; a cancel mid-stream frees the server's slot."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlperf_loadgen")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_serving  # noqa: E402

from optistack.serving import HttpBackend, backends_for  # noqa: E402
from optistack.serving.backend import SamplingParams, ServingError  # noqa: E402
from optistack.serving.http import create_app  # noqa: E402
from optistack.serving.http_client import HttpRequestHandle  # noqa: E402
from optistack.serving.launch import listen  # noqa: E402
from optistack.serving.loadgen_scenario import ScenarioOptions, run_scenario  # noqa: E402
from optistack.serving.samples import samples_from_ids  # noqa: E402

CONTEXT = 256
IN, OUT = (8, 40), (6, 20)


class Recorded:
    """The server's real backend, keeping every handle it gives out (to compare with what the client counted)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.max_context = inner, inner.name, inner.max_context
        self.handles = []

    def submit(self, *args, **kwargs):
        handle = self.inner.submit(*args, **kwargs)
        self.handles.append(handle)
        return handle

    def stats(self):
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


RecordingHttpBackend = tiny_serving.recording(HttpBackend)


@pytest.fixture(scope="module")
def live():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = tiny_serving.tokenizer()
    backend = Recorded(backends_for(tiny_serving.model(tok, context=CONTEXT), tok, max_batch=4, max_context=CONTEXT))
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(backend, tok, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _until(lambda: server.started)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = RecordingHttpBackend(url, max_context=CONTEXT, timeout_s=60)
    yield url, backend, client
    client.close()
    server.should_exit = True
    thread.join(10)
    backend.close()
    sock.close()
    torch.set_num_threads(threads)


def _until(check, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(4, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # no special tokens


def _ordered(stats) -> bool:
    return 0 < stats.p50 <= stats.p90 <= stats.p99 <= stats.max


def test_loadgen_offline_and_server_runs_over_http(live):
    url, server_backend, client = live
    ids = torch.randint(4, 256, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    samples = samples_from_ids(ids, 6, seed=1, input_tokens=IN, output_tokens=OUT)
    options = ScenarioOptions(samples=6, server_samples=4, qps_min=3.0, search_steps=1, max_run_s=10, drain_timeout_s=20,
                              offline_timeout_s=30, input_tokens=IN, output_tokens=OUT)
    before_client, before_server = len(client.handles), len(server_backend.handles)
    result = run_scenario(client, samples, options, role="optimized")

    assert result.role == "optimized" and result.backend["model"] == "tiny" and result.backend["url"] == url
    offline, (server,) = result.offline, result.server_runs
    assert (offline.issued, offline.answered, offline.failed) == (6, 6, 0)
    assert server.offered_qps == 3.0 and (server.issued, server.answered, server.failed) == (4, 4, 0)
    for run in (offline, server):
        assert _ordered(run.ttft_s) and _ordered(run.tpot_s)
    lg = server.loadgen
    assert 0 < lg["ttft_p50"] <= lg["ttft_p90"] <= lg["ttft_p99"] and 0 < lg["tpot_p50"] <= lg["tpot_p99"]

    handles = client.handles[before_client:]
    served = server_backend.handles[before_server:]
    assert len(handles) == len(served) == 1 + 6 + 4  # the warm-up, the Offline run, the Server run
    for h in handles:  # each count is the server's usage, whatever the number of text events
        assert h.finish_reason in ("length", "stop") and h.status == 200
        assert len(h.tokens) == len(h.token_times) == h.usage["completion_tokens"] and h.tokens == list(range(len(h.tokens)))
        assert 1 <= len(h.pieces) <= len(h.tokens)
        assert h.token_times == sorted(h.token_times) and h.token_times[0] >= h.submitted_at
    assert any(len(h.pieces) < len(h.tokens) for h in handles)  # held-back UTF-8 / hidden tokens: reconciled
    # what the harness reported to LoadGen (n_tokens = len(handle.tokens)) is what the server generated
    assert offline.tokens + server.tokens == sum(len(h.tokens) for h in handles[1:]) == sum(len(h.tokens) for h in served[1:])
    assert sorted(len(h.tokens) for h in handles) == sorted(len(h.tokens) for h in served)


def test_streamed_greedy_text_is_the_servers_whole_answer(live):
    url, server_backend, client = live
    prompt = _prompt(12, seed=5)
    handle = client.submit(prompt, SamplingParams(max_new_tokens=24))
    streamed = list(handle.stream(timeout=30))
    whole = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=30)
    answer = whole.json()
    assert handle.finish_reason == answer["choices"][0]["finish_reason"]
    assert handle.text == answer["choices"][0]["text"] and handle.text
    assert streamed == handle.tokens and len(handle.tokens) == answer["usage"]["completion_tokens"]
    assert handle.usage == answer["usage"] and handle.ttft_s > 0


def test_the_servers_400_reaches_the_handle(live):
    url, _, _ = live
    too_long = _prompt(CONTEXT + 20, seed=6)
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": too_long, "max_tokens": 4, "temperature": 0}, timeout=30)
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "context is 256 tokens" in message
    with HttpBackend(url, "tiny", max_context=4 * CONTEXT) as wide:  # the client thinks the context is larger
        handle = wide.submit(too_long, SamplingParams(max_new_tokens=4))
        assert handle.wait(30)
    assert handle.finish_reason == "error" and handle.error == f"HTTP 400: {message}" and handle.status == 400
    assert handle.tokens == [] and handle.usage is None


def test_cancel_mid_stream_frees_the_servers_slot(live):
    url, server_backend, client = live
    handle = client.submit(_prompt(8, seed=7), SamplingParams(max_new_tokens=CONTEXT - 8))
    _until(lambda: len(handle.tokens) >= 2)
    served = server_backend.handles[-1]
    handle.cancel()
    assert handle.wait(10) and handle.finish_reason == "cancelled" and handle.error is None
    _until(lambda: served.done.is_set())
    assert served.finish_reason == "cancelled" and len(served.tokens) < CONTEXT - 8
    _until(lambda: httpx.get(f"{url}/health").json()["requests_in_flight"] == 0)
    _until(lambda: httpx.get(f"{url}/health").json()["backend"]["in_flight"] == 0)
    health = httpx.get(f"{url}/health").json()["backend"]
    assert health["manager_active"] == health["manager_waiting"] == health["cache_holders"] == 0
    _until(lambda: client.active == 0)


def test_close_ends_open_streams_and_frees_the_server(live):
    url, server_backend, _ = live
    other = HttpBackend(url, max_context=CONTEXT)
    handle = other.submit(_prompt(8, seed=9), SamplingParams(max_new_tokens=CONTEXT - 8))
    _until(lambda: len(handle.tokens) >= 1)
    other.close()
    assert handle.done.is_set() and handle.finish_reason == "error"
    assert handle.error == f"backend {other.name!r} was closed while this request ran"
    _until(lambda: server_backend.handles[-1].done.is_set())
    _until(lambda: httpx.get(f"{url}/health").json()["backend"]["in_flight"] == 0)


def test_reconcile_makes_the_count_the_servers_and_keeps_first_and_last_times(live):
    _, _, client = live
    handle = HttpRequestHandle(client, [5], SamplingParams(max_new_tokens=8))
    for at in (1.0, 2.0, 3.0):  # three text events
        handle.push(len(handle.tokens), at=at)
    handle.usage = {"completion_tokens": 5}  # two tokens had no text of their own: they arrived by the finish event
    HttpBackend._reconcile(handle, 4.0)
    assert handle.tokens == [0, 1, 2, 3, 4] and handle.token_times == [1.0, 2.0, 3.0, 4.0, 4.0]
    handle.usage = {"completion_tokens": 2}  # a server that split its tokens' text over more events
    HttpBackend._reconcile(handle, 9.0)
    assert handle.tokens == [0, 1] and handle.token_times == [1.0, 4.0]
    handle.usage = None  # no usage event: the text events are the count
    HttpBackend._reconcile(handle, 9.0)
    assert handle.tokens == [0, 1]


def test_refusals_are_one_clear_error(live):
    url, _, client = live
    for params, field in ((SamplingParams(stop_token_ids=(2,)), "stop_token_ids"),
                          (SamplingParams(max_new_tokens=8, min_new_tokens=2), "min_new_tokens"),
                          (SamplingParams(repetition_penalty=1.2), "repetition_penalty"),
                          (SamplingParams(do_sample=True, top_k=5), "top_k")):
        with pytest.raises(ServingError, match=f"^{field}=.* cannot be sent to an OpenAI-compatible server"):
            client.submit([5, 6, 7], params)
    with pytest.raises(ServingError, match="exceeds this backend's context of 256 tokens"):
        client.submit(_prompt(CONTEXT, seed=8), SamplingParams(max_new_tokens=4))
    with pytest.raises(ServingError, match="model 'other' is not served at .*; it serves: tiny"):
        HttpBackend(url, "other", max_context=CONTEXT)
    with pytest.raises(ServingError, match="base_url must be an http:// or https:// URL"):
        HttpBackend("127.0.0.1:8000", max_context=CONTEXT)
    with pytest.raises(ServingError, match="max_context must be an integer >= 2"):
        HttpBackend(url, max_context=None)
    closed = listen("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ServingError, match=f"cannot reach the server at http://127.0.0.1:{port}/v1/models: ConnectError"):
        HttpBackend(f"http://127.0.0.1:{port}/v1", max_context=CONTEXT)
    done = HttpBackend(url, max_context=CONTEXT)
    done.close()
    with pytest.raises(ServingError, match="is closed; make a new one"):
        done.submit([5, 6], SamplingParams(max_new_tokens=2))
