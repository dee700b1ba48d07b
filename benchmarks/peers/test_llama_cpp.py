"""llama.cpp vs optistack on the bundled SmolLM2-135M Q4_1 GGUF, side by side in one run.

Both engines get the same token ids (the smollm2 workload's 128-token generation prompt), batch 1,
the same thread count, and decode 128 greedy tokens. Order: optistack's pipeline is built and
compiled first (its build time is reported apart), then llama.cpp, optistack, llama.cpp again, so a
machine that drifts shows as a gap between llama.cpp's two runs. Reported per engine: decode tokens/s
(1000 / median per-token time, median over repeats) and TTFT (prompt evaluation + first token).

llama.cpp runs in a subprocess (`llama_cpp_runner.py`): its native build decodes fastest here but
segfaults in batched prompt evaluation on some AMX CPUs, and a crash must be a row of the table, not
the end of the run. Decode is timed with `n_batch=1` (one token per call, which decode is anyway);
TTFT takes the fastest prompt batch size that works from `N_BATCH_LADDER`. Other builds (e.g. an
AVX-512 build without AMX in its own virtualenv) join with
`OPTISTACK_LLAMA_CPP_PYTHONS="avx512=/path/to/.venv-llama-avx512/bin/python"`.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peer_results import median_or_none

RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
N_BATCH_LADDER = (512, 64, 16, 1)  # prompt batch sizes tried for TTFT, largest first
INSTALL_HINT = ("llama.cpp peer needs llama-cpp-python: pip install 'optistack[peers]' (builds llama.cpp from "
                "source, ~5-8 min on 2 cores), or name other builds in OPTISTACK_LLAMA_CPP_PYTHONS")


def llama_pythons() -> list[tuple[str, str]]:
    """(label, interpreter) for every llama.cpp build to measure: this venv's, then the env's list."""
    found = [("this venv", sys.executable)] if importlib.util.find_spec("llama_cpp") else []
    for item in filter(None, os.environ.get("OPTISTACK_LLAMA_CPP_PYTHONS", "").split(",")):
        label, _, python = item.partition("=")
        if not python or not Path(python).exists():
            raise pytest.UsageError(f"OPTISTACK_LLAMA_CPP_PYTHONS: {item!r} is not label=/path/to/python")
        found.append((label.strip(), python.strip()))
    return found


pytestmark = pytest.mark.skipif(not llama_pythons(), reason=INSTALL_HINT)


def build_label(system_info: str) -> str:
    """The CPU features llama.cpp was built with and found, from llama_print_system_info()."""
    flags = [part.split("=")[0].strip() for part in system_info.replace("|", ";").split(";") if part.strip().endswith("= 1")]
    keep = [f for f in flags if f.startswith(("AVX", "AMX", "F16C", "FMA", "OPENMP", "REPACK"))]
    return " ".join(keep) or system_info[:80]


def run_llama(python: str, gguf: Path, ids: Path, settings: dict, n_batch: int, ttft_only: bool = False) -> dict:
    """The runner's JSON, or {"status": "crashed (SIGSEGV)" ...} when the engine died."""
    cmd = [python, str(RUNNER), "--model", str(gguf), "--prompt-ids", str(ids), "--new-tokens",
           str(settings["new_tokens"]), "--threads", str(settings["threads"]), "--n-batch", str(n_batch),
           "--repeats", str(settings["repeats"])] + (["--ttft-only"] if ttft_only else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        why = (f"crashed ({signal.Signals(-proc.returncode).name})" if proc.returncode < 0
               else f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}")
        return {"status": why, "n_batch": n_batch}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["status"] = "ok"
    return out


def best_ttft(python: str, gguf: Path, ids: Path, settings: dict, table, label: str) -> dict | None:
    """Every prompt batch size of the ladder, each a row; the fastest that worked."""
    best = None
    for n_batch in N_BATCH_LADDER:
        r = run_llama(python, gguf, ids, settings, n_batch, ttft_only=True)
        ttft = median_or_none(r.get("ttft_ms", []))
        table.add(f"llama.cpp ({label})", f"prompt n_batch={n_batch}", ttft_ms=ttft, status=r["status"])
        if ttft is not None and (best is None or ttft < best["ttft_ms"]):
            best = {"ttft_ms": ttft, "n_batch": n_batch}
    return best


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure_ours(model, prompt, settings: dict) -> dict:
    from optistack.generation import generation_measurements

    runs = [generation_measurements(model, prompt, settings["new_tokens"]) for _ in range(settings["repeats"])]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in runs], "ttft_ms_runs": [r["ttft_ms"] for r in runs]}


def test_llama_cpp_side_by_side(peer_settings, results_table, causal_lm_prompt, tmp_path):
    pythons = llama_pythons()
    import torch

    from optistack.bundled_models import smollm2_gguf
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode

    settings = dict(peer_settings)
    torch.set_num_threads(settings["threads"])
    wl, prompt = causal_lm_prompt
    gguf = smollm2_gguf()
    ids = tmp_path / "prompt_ids.json"
    ids.write_text(json.dumps(prompt[0].tolist()))
    text = os.environ.get("OPTISTACK_PEER_PIPELINE", "@llm-decode")
    pipeline = Pipeline.parse(text)
    settings.update(gguf=gguf.name, optistack_pipeline=str(pipeline), preset=pipeline.preset)
    table = results_table("llama-cpp", settings)

    # ours, built and compiled before anything is timed: build time is not run time
    started = time.perf_counter()
    model = pipeline.apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
    built = time.perf_counter()
    ours_tokens = greedy_decode(model, prompt, settings["new_tokens"]).tokens[0].tolist()  # compiles the step
    table.notes.append(f"optistack: pipeline applied in {built - started:.0f} s, first generation (compile) "
                       f"{time.perf_counter() - built:.0f} s; neither is in the numbers")

    before = {label: run_llama(py, gguf, ids, settings, n_batch=1) for label, py in pythons}
    ttft = {label: best_ttft(py, gguf, ids, settings, table, label) for label, py in pythons}
    ours = measure_ours(model, prompt, settings)
    after = {label: run_llama(py, gguf, ids, settings, n_batch=1) for label, py in pythons}
    original = measure_ours(wl.model, prompt, settings) if os.environ.get("OPTISTACK_PEER_BASELINE", "1") != "0" else None

    table.add("optistack", f"{text} = {pipeline}", tokens_per_s=ours["tokens_per_s"], ttft_ms=ours["ttft_ms"])
    if original is not None:
        table.add("optistack", "fp32 eager (the original)", tokens_per_s=original["tokens_per_s"],
                  ttft_ms=original["ttft_ms"])
    assert len(ours_tokens) == settings["new_tokens"] and ours["tokens_per_s"] > 0
    for label, _ in pythons:
        for when, r in (("before ours", before[label]), ("after ours", after[label])):
            setting = f"decode n_batch=1 ({when})"
            if r["status"] == "ok":
                setting = f"llama-cpp-python {r['version']}, {build_label(r['system_info'])}, {setting}"
            table.add(f"llama.cpp ({label})", setting, tokens_per_s=median_or_none(r.get("tokens_per_s", [])),
                      status=r["status"])
        runs = [r for r in (before[label], after[label]) if r["status"] == "ok"]
        if not runs:
            continue
        assert all(len(r["tokens"]) == settings["new_tokens"] for r in runs)
        peer_tps = statistics.mean(median_or_none(r["tokens_per_s"]) for r in runs)
        table.ratios[f"decode tokens/s, optistack / llama.cpp ({label})"] = ours["tokens_per_s"] / peer_tps
        if ttft[label] is not None:
            table.ratios[f"TTFT, optistack / llama.cpp ({label}, best working prompt path n_batch="
                         f"{ttft[label]['n_batch']})"] = ours["ttft_ms"] / ttft[label]["ttft_ms"]
        table.ratios[f"greedy tokens shared with llama.cpp ({label}) before the first difference"] = \
            f"{shared_prefix(ours_tokens, runs[0]['tokens'])} of {settings['new_tokens']}"
    table.notes.append("llama.cpp runs once before and once after optistack: a gap between them is machine drift")
