"""optistack's GGUF in llama.cpp: SmolLM2 quantized by optistack, written by `save_gguf`, loaded and run
by llama.cpp; perplexity there vs ours on the same token ids, greedy tokens compared, and llama.cpp's
decode speed on our file vs on its own quantization (llama_model_quantize) of the same type.

Per pipeline (default: `rtn-int4{zero_grid=integer,group_size=32,head=int8}` and
`gptq{zero_grid=integer,group_size=64,head=int8}`; `OPTISTACK_GGUF_PIPELINES="a;b"` overrides): our
perplexity on the smollm2 workload's first `OPTISTACK_GGUF_CHUNKS` (default 4) 512-token evaluation
chunks, llama.cpp's on the same ids (`llama_cpp_logits.py`, one fresh context per chunk, every
position's logits), and 32 greedy tokens from the workload's 128-token prompt. The bar: within 1%.
Also scored: the fp32 model written as F32 GGUF (the writer without quantization) and llama.cpp's own
Q4_1 of that F32 file. Speed: llama.cpp decode tokens/s (n_batch=1, `llama_cpp_runner.py`) on our
first GGUF and on its own quantization of the same ggml type, alternated twice; bar >= 0.95x
(`OPTISTACK_GGUF_SPEED=0` skips it). llama.cpp gets `OPTISTACK_GGUF_THREADS` threads (default 1: its
worker threads spin-wait, and on a loaded 2-core machine 2 threads ran ~100x slower than 1).
Skipped with the reason where llama-cpp-python is not installed.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from peer_results import median_or_none

HERE = Path(__file__).parent
PIPELINES = ("rtn-int4{zero_grid=integer,group_size=32,head=int8}", "gptq{zero_grid=integer,group_size=64,head=int8}")
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}
GREEDY = 32

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp)")


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["status"] = "ok"
    return out


def _our_perplexity(model, chunks) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in chunks:
            t = torch.tensor([ids])
            logits = model(input_ids=t, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def _agreement(a: list[int], b: list[int]) -> str:
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b))
    return f"first {prefix} identical, {same}/{len(a)} equal"


def test_gguf_in_llama_cpp(peer_settings, results_table, causal_lm_prompt, tmp_path):
    import torch

    from optistack.checkpoints import save_gguf
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode

    threads = os.environ.get("OPTISTACK_GGUF_THREADS", "1")  # llama.cpp's threads spin: 2 on a loaded 2-core box crawl
    torch.set_num_threads(peer_settings["threads"])
    wl, prompt = causal_lm_prompt
    n_chunks = int(os.environ.get("OPTISTACK_GGUF_CHUNKS", "4"))
    chunks = [c[0].tolist() for c in wl._chunks[:n_chunks]]
    (tmp_path / "chunks.json").write_text(json.dumps(chunks))
    (tmp_path / "prompt.json").write_text(json.dumps(prompt[0].tolist()))
    texts = [t for t in os.environ.get("OPTISTACK_GGUF_PIPELINES", ";".join(PIPELINES)).split(";") if t.strip()]
    table = results_table("gguf-roundtrip", {"chunks": f"{n_chunks} x {len(chunks[0])}", "threads": threads,
                                             "greedy_tokens": GREEDY},
                          columns=("ggml_type", "ppl_optistack", "ppl_llama_cpp", "ppl_ratio", "greedy", "tokens_per_s"))

    def score(gguf: Path) -> dict:
        return _run("llama_cpp_logits.py", "score", "--model", str(gguf), "--chunks", str(tmp_path / "chunks.json"),
                    "--prompt-ids", str(tmp_path / "prompt.json"), "--new-tokens", str(GREEDY), "--threads", threads)

    def compare(label: str, model, gguf: Path, ggml_type: str) -> float | None:
        ours_ppl = _our_perplexity(model, chunks)
        ours_tokens = greedy_decode(model, prompt, GREEDY).tokens[0].tolist()
        r = score(gguf)
        if r["status"] != "ok":
            table.add(label, str(gguf.name), ggml_type=ggml_type, ppl_optistack=ours_ppl, status=r["status"])
            return None
        ratio = r["perplexity"] / ours_ppl
        table.ratios[f"greedy tokens, llama.cpp vs optistack, {label}"] = _agreement(ours_tokens, r["greedy"])
        table.add(label, gguf.name, ggml_type=ggml_type, ppl_optistack=ours_ppl, ppl_llama_cpp=r["perplexity"],
                  ppl_ratio=ratio, greedy=_agreement(ours_tokens, r["greedy"]), status="ok")
        return ratio

    f32 = save_gguf(tmp_path / "f32.gguf", wl.model, float_type="f32")
    if os.environ.get("OPTISTACK_GGUF_F32", "1") != "0":  # =0 skips scoring it (the speed part still quantizes it)
        compare("fp32 (F32 GGUF)", wl.model, f32.path, "F32")
    written = []
    for text in texts:
        model = Pipeline.parse(text).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
        out = save_gguf(tmp_path / f"ours-{len(written)}.gguf", model, pipeline=text)
        table.notes.append(out.summary())
        ratio = compare(f"optistack {text}", model, out.path, out.file_type)
        written.append(out)
        if ratio is not None:
            table.ratios[f"llama.cpp / optistack perplexity, {text}"] = ratio
        del model

    if os.environ.get("OPTISTACK_GGUF_SPEED", "1") == "0":
        return
    ggml_type = written[0].file_type
    theirs = tmp_path / f"llama-cpp-{ggml_type}.gguf"
    q = _run("llama_cpp_logits.py", "quantize", "--model", str(f32.path), "--out", str(theirs), "--ftype",
             str(FTYPES[ggml_type]), "--threads", threads)
    if q["status"] != "ok":
        table.notes.append(f"llama_model_quantize {ggml_type}: {q['status']}")
        return
    r = score(theirs)
    table.add(f"llama.cpp's own {ggml_type} of the fp32", theirs.name, ggml_type=ggml_type,
              ppl_llama_cpp=r.get("perplexity"), status=r["status"])
    ids = tmp_path / "prompt.json"
    speed: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(2):  # alternated, so drift shows and averages out
        for who, path in (("theirs", theirs), ("ours", written[0].path)):
            t = _run("llama_cpp_runner.py", "--model", str(path), "--prompt-ids", str(ids), "--new-tokens", "64",
                     "--threads", threads, "--n-batch", "1", "--repeats", "2")
            if t["status"] == "ok":
                speed[who].append(median_or_none(t["tokens_per_s"]))
    for who, path in (("ours", written[0].path), ("theirs", theirs)):
        tps = statistics.mean(speed[who]) if speed[who] else None
        table.add(f"llama.cpp decode, {who}", path.name, ggml_type=ggml_type, tokens_per_s=tps, status="ok")
    if speed["ours"] and speed["theirs"]:
        table.ratios[f"llama.cpp decode tokens/s, our {ggml_type} GGUF / its own {ggml_type}"] = \
            statistics.mean(speed["ours"]) / statistics.mean(speed["theirs"])
    table.notes.append("timings taken on a shared, loaded machine: ratios only, and only side by side")
