"""`optistack serve`: a saved optimized folder (or a Hugging Face folder) is loaded with its tokenizer and
served; a folder that is not a model is one clear error; the real command listens, answers and stops."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_serving  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from optistack.cli import main  # noqa: E402
from optistack.core.persist import save_model  # noqa: E402
from optistack.serving.backend import ServingError  # noqa: E402
from optistack.serving.launch import prepare  # noqa: E402

PROMPT = "Assignment statements"


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_serving.tokenizer()
    return tok, tiny_serving.model(tok, context=128)


def _saved(path: Path, model, workload: dict | None = None) -> Path:
    return save_model(path, model, model, [], workload or {"name": "tiny", "kind": "causal-lm"})


def _answer(served) -> dict:
    with TestClient(served.app) as client:
        return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()


def _greedy_text(tok, model) -> str:
    return tiny_serving.text_of(tok, tiny_serving.greedy(model, tok(PROMPT)["input_ids"], 8, eos=tok.eos_token_id))


def test_a_saved_folder_with_its_tokenizer_serves_what_the_model_generates(tiny, tmp_path):
    tok, model = tiny
    folder = _saved(tmp_path / "saved", model)
    tok.save_pretrained(folder)
    served = prepare(folder, max_context=64, threads=1)  # backend "auto": serving.backends_for(model)
    try:
        assert served.model_name == "saved" and served.backend.max_context == 64
        assert _answer(served)["choices"][0]["text"] == _greedy_text(tok, model)
        with TestClient(served.app) as client:
            assert client.get("/health").json()["backend"]["name"] == served.backend.name
    finally:
        served.backend.close()


def test_the_tokenizer_is_found_through_the_manifest_or_refused_with_the_fix(tiny, tmp_path):
    tok, model = tiny
    original = tmp_path / "original"
    model.save_pretrained(original)
    tok.save_pretrained(original)
    folder = _saved(tmp_path / "saved", model, {"name": "original", "model_id": str(original)})
    served = prepare(folder, model_name="mine")
    try:
        body = _answer(served)
        assert body["model"] == "mine" and body["choices"][0]["text"] == _greedy_text(tok, model)
    finally:
        served.backend.close()
    bare = _saved(tmp_path / "bare", model)
    with pytest.raises(ServingError, match="holds no tokenizer .* give --tokenizer FOLDER"):
        prepare(bare)
    prepare(bare, tokenizer=original, backend="simple").backend.close()
    with pytest.raises(ServingError, match="backend must be one of auto, simple"):
        prepare(bare, tokenizer=original, backend="fast")


def test_kv_is_the_engines_and_a_wrong_one_is_one_clear_error(tiny, tmp_path):
    """`--kv` chooses the decode engine's cache: a name it does not know, a backend with its own cache, or a
    model without an engine are each refused with what would be valid."""
    tok, model = tiny
    folder = _saved(tmp_path / "saved", model)
    tok.save_pretrained(folder)
    with pytest.raises(ServingError, match="kv must be one of auto, float16, float32, int8; got 'int4'"):
        prepare(folder, kv="int4")
    with pytest.raises(ServingError, match="backend 'simple' has its own"):
        prepare(folder, kv="int8", backend="simple")
    with pytest.raises(ServingError, match="has no engine"):
        prepare(folder, kv="int8")
    prepare(folder, kv="auto").backend.close()


def test_a_hugging_face_folder_serves_too(tiny, tmp_path):
    tok, model = tiny
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    served = prepare(tmp_path / "hf", backend="simple")
    try:
        assert served.backend.name == "simple" and served.backend.max_context == 128
        assert _answer(served)["choices"][0]["text"] == _greedy_text(tok, model)
    finally:
        served.backend.close()


def test_a_folder_that_is_not_a_model_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "optistack.json").write_text("{")
    cases = {"missing": "no such folder", "empty": "is not a model folder", "file.txt": "is a file",
             "broken": "cannot load"}
    for name, message in cases.items():
        assert main(["serve", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("optistack: error: ") and message in err and err.count("\n") == 1, err


def test_the_command_listens_answers_and_stops_on_ctrl_c(tiny, tmp_path):
    tok, model = tiny
    folder = _saved(tmp_path / "cli-model", model)
    tok.save_pretrained(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "optistack.cli", "serve", str(folder), "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        for line in proc.stderr:
            if "optistack serve:" in line:
                break
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        assert httpx.get(f"{url}/health", timeout=30).json()["model"] == "cli-model"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}, timeout=30)
        assert json.loads(r.text)["choices"][0]["text"] == _greedy_text(tok, model)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
