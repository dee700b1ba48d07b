"""TTFT and decode against OpenVINO GenAI's `LLMPipeline` (llm_pipeline_peers.py), in `make bench-peers`.

Each model runs the script in its own process (its memory leaves with it) with the shared peer settings
(threads, prompt and new tokens, `OPTISTACK_PEER_REPEATS` TTFT calls a round) and `OPTISTACK_PEER_ROUNDS`
interleaved rounds (5). SmolLM2-135M by default; `OPTISTACK_LLM_PIPELINE_MODELS=smollm2,llama-1.1b` adds the ~1.1B
random-weight Llama (its 4.4 GB fp32 folder and int4 IR are made once, ~10 min on 2 cores; ~8 GiB resident while
it runs). Prints every round and the ratios; writes `llm_pipeline_<model>.json` under `.benchmarks/peers/` (or
`$OPTISTACK_PEERS_OUT`). Skipped with the reason where openvino-genai or optimum-intel's export is missing.
Numbers are printed, never asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from openvino_export import MARKER, ExportUnavailable, exporter_python
from openvino_genai_backend import available

SCRIPT = Path(__file__).with_name("llm_pipeline_peers.py")
MODELS = ("smollm2", "llama-1.1b")
CACHED_IR = {"smollm2": "smollm2-135m-instruct-int4-asym-g64", "llama-1.1b": "llama-1.1b-random-seed0-int4-asym-g64"}


def _models() -> list[str]:
    raw = os.environ.get("OPTISTACK_LLM_PIPELINE_MODELS", "smollm2")
    names = [m.strip() for m in raw.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        raise pytest.UsageError(f"OPTISTACK_LLM_PIPELINE_MODELS={raw!r}: give a comma-separated subset of {list(MODELS)}")
    return names


def _export_missing(model: str) -> str | None:
    """Why the int4 IR cannot be had here (no exporter and nothing cached), else None."""
    try:
        exporter_python()
        return None
    except ExportUnavailable as exc:
        from optistack.bundled_models import cache_root

        return None if (cache_root() / "openvino-genai" / CACHED_IR[model] / MARKER).is_file() else str(exc)


@pytest.mark.skipif(not available()[0], reason=available()[1])
@pytest.mark.parametrize("model", _models())
def test_llm_pipeline_side_by_side(model, peer_settings):
    why = _export_missing(model)
    if why:
        pytest.skip(why)
    raw = os.environ.get("OPTISTACK_PEER_ROUNDS", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"OPTISTACK_PEER_ROUNDS must be a positive integer, got {raw!r}")
    rounds = int(raw)
    out = Path(os.environ.get("OPTISTACK_PEERS_OUT") or ".benchmarks/peers") / f"llm_pipeline_{model}.json"
    cmd = [sys.executable, str(SCRIPT), "--model", model, "--rounds", str(rounds),
           "--repeats", str(peer_settings["repeats"]), "--threads", str(peer_settings["threads"]),
           "--prompt-tokens", str(peer_settings["prompt_tokens"]), "--new-tokens", str(peer_settings["new_tokens"]),
           "--json", str(out)]
    if os.environ.get("OPTISTACK_PEER_PIPELINE"):
        cmd += ["--chain", os.environ["OPTISTACK_PEER_PIPELINE"]]
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3600)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, f"{SCRIPT.name} --model {model} exited {proc.returncode}"
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == rounds
    assert all(len(run["tokens"]) == peer_settings["new_tokens"] for run in result["greedy_first_run"].values())
