"""Int4 on SmolLM2's fp32, one table: llm-compressor's GPTQ and AWQ, llama.cpp's own quantizers, and
optistack's `gptq` and `awq`, scored on the same evaluation token ids, with bits per weight and time.

- Calibration: optistack's own 32 x 128-token windows (`calibration_ids`, what `gptq` and `awq` re-cut
  from the workload's calibration text), handed to llm-compressor as a dataset of those token ids.
- Grid: int4, asymmetric (integer zero points), groups of 64 and 128, `lm_head` (tied to the embedding)
  left in float. llm-compressor: `W4A16_ASYM` with `group_size` set (`llmcompressor_gptq.py`,
  `llmcompressor_awq.py`); optistack: `gptq{zero_grid=integer,group_size=G}` and `awq{...}`.
  llama.cpp: `llama_model_quantize` of the F32 GGUF (no importance matrix), Q4_0 and Q4_K_M by default
  (`OPTISTACK_SIDE_LLAMA_TYPES=Q4_0,Q4_K_M,Q4_1`); needs llama-cpp-python, else those rows are skipped.
- Perplexity: the smollm2 workload's first `OPTISTACK_SIDE_CHUNKS` (default 4) 512-token evaluation
  chunks, the mean NLL of tokens 1.. of each chunk: optistack's models and llm-compressor's reloaded
  checkpoint (transformers + compressed-tensors, dequantized) by the model's forward here, llama.cpp's
  by its own logits (`llama_cpp_logits.py`). llm-compressor's runner also scores its in-memory model
  on the same chunks before saving: a cross-check of the reload, and the number used if it fails.
- Bits per weight: of the decoder blocks' Linear weights (embedding/head excluded), stored bytes x 8 /
  weights, from the file each one writes (GGUF tensors; compressed-tensors safetensors). Where optistack's
  compressed-tensors save cannot hold the grid (576 columns in groups of 128: the format has no ragged
  groups, so those layers go dense), the format's layout is counted instead (`ct_bits`).
- Seconds: quantization wall time (llm-compressor: its `oneshot`; optistack: the pass; llama.cpp: the
  quantize subprocess) on this machine as loaded as it is: indicative only.

Skipped with the reason where llm-compressor's venv is absent (see `test_awq_llmcompressor.py`).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_awq_llmcompressor import SAMPLES, SEQ_LEN, _peer_python

HERE = Path(__file__).parent
GROUPS = (64, 128)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15}
OURS = {"gptq": "gptq{{group_size={g},zero_grid=integer}}", "awq": "awq{{group_size={g},zero_grid=integer}}"}
PEER = {"gptq": ("GPTQModifier", "llmcompressor_gptq.py"), "awq": ("AWQModifier", "llmcompressor_awq.py")}
CT_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.")
GGUF_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")


def ct_bits(shapes: list[tuple[int, int]], group: int) -> float:
    """Bits per weight of compressed-tensors' asymmetric int4 `pack-quantized` layout: codes packed 8 per
    int32, an fp32 scale and an int4 zero point (packed 8 per int32 down the rows) per group, the shape."""
    stored = sum(n * math.ceil(k / 8) * 4 + n * math.ceil(k / group) * 4 + math.ceil(n / 8) * math.ceil(k / group) * 4
                 + 16 for n, k in shapes)
    return 8 * stored / sum(n * k for n, k in shapes)


def file_bits(path: Path, weights: int) -> float:
    """Stored bytes x 8 of the block Linear tensors in a GGUF file or a safetensors folder / `weights`."""
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        return 8 * sum(int(t.n_bytes) for t in GGUFReader(path).tensors if GGUF_LINEAR.fullmatch(t.name)) / weights
    stored = 0
    for shard in path.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        stored += sum(m["data_offsets"][1] - m["data_offsets"][0] for k, m in header.items() if CT_LINEAR.match(k))
    return 8 * stored / weights


def _json_run(cmd: list[str], env: dict | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
        return {"status": f"failed (exit {proc.returncode}): {last[0][:300] if last else ''}"}, wall
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}, wall


@pytest.mark.slow
def test_int4_side_by_side(tmp_path, results_table):
    pytest.importorskip("compressed_tensors")
    python = _peer_python()
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from optistack.bundled_models import smollm2_dir
    from optistack.checkpoints import save_gguf, save_pretrained
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.passes.quant.awq import calibration_ids
    from optistack.workloads.smollm2 import SmolLM2Workload

    chunks_n = int(os.environ.get("OPTISTACK_SIDE_CHUNKS", "4"))
    types = [t for t in os.environ.get("OPTISTACK_SIDE_LLAMA_TYPES", "Q4_0,Q4_K_M").split(",") if t]
    bad = [t for t in types if t not in FTYPES]
    if bad:
        raise pytest.UsageError(f"OPTISTACK_SIDE_LLAMA_TYPES: unknown {bad}; choose from {', '.join(FTYPES)}")
    torch.set_num_threads(2)
    wl = SmolLM2Workload(ppl_chunk=512, ppl_chunks=chunks_n)
    ctx = PassContext(workload=wl)
    shapes = {n: tuple(m.weight.shape) for n, m in wl.model.named_modules() if CT_LINEAR.match(n + ".")}
    weights = sum(a * b for a, b in shapes.values())
    table = results_table("int4-side-by-side", {
        "model": "SmolLM2-135M-Instruct fp32 (dequantized Q4_1 of its GGUF)", "bits": 4, "zero_point": "integer",
        "calibration": f"{SAMPLES} x {SEQ_LEN} token ids (optistack's)", "ignore": "lm_head (tied)",
        "evaluation": f"{chunks_n} x 512 tokens", "load_average": os.getloadavg()[0]},
        columns=("group", "perplexity", "vs_fp32_pct", "bits_per_weight", "seconds"))
    (tmp_path / "calib.json").write_text(json.dumps(calibration_ids(ctx, SAMPLES, SEQ_LEN, "gptq").tolist()))
    (tmp_path / "chunks.json").write_text(json.dumps([c[0].tolist() for c in wl._chunks]))
    fp32 = wl.evaluate(wl.model)["perplexity"]

    def add(engine: str, setting: str, group, ppl, bits, seconds, status="ok"):
        table.add(engine, setting, group=group, perplexity=ppl, vs_fp32_pct=None if ppl is None else
                  100 * (ppl / fp32 - 1), bits_per_weight=bits, seconds=seconds, status=status)
        print(f"  {engine:22s} {setting:44s} g{group} ppl {ppl} bits {bits} {seconds} s {status}", file=sys.stderr,
              flush=True)

    add("fp32", "original", None, fp32, 32.0, None)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for g in GROUPS:
        for method in ("gptq", "awq"):
            text = OURS[method].format(g=g)
            start = time.perf_counter()
            model = Pipeline.parse(text).apply(copy.deepcopy(wl.model), ctx).model
            seconds = time.perf_counter() - start
            ppl = wl.evaluate(model)["perplexity"]
            if all(k % g == 0 for _, k in shapes.values()):
                bits = file_bits(save_pretrained(tmp_path / f"ours-{method}-{g}", model), weights)
            else:
                bits = ct_bits(list(shapes.values()), g)
                table.notes.append(f"optistack {method} g{g}: bits counted by compressed-tensors' layout (ct_bits); its "
                                   "save writes layers whose columns are not a multiple of the group dense")
            del model
            add("optistack", text, g, ppl, bits, seconds)

            modifier, script = PEER[method]
            out = tmp_path / f"llmc-{method}-{g}"
            r, wall = _json_run([python, str(HERE / script), str(smollm2_dir()), str(tmp_path / "calib.json"), str(out),
                                 str(g), str(tmp_path / "chunks.json")], env)
            if r["status"] != "ok":
                add("llm-compressor", f"{modifier} W4A16_ASYM group_size={g}", g, None, None, None, r["status"])
                continue
            table.details[f"llm-compressor {method} g{g}"] = {**r, "subprocess_wall_s": wall}
            try:
                theirs = AutoModelForCausalLM.from_pretrained(
                    out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
                ppl, how = wl.evaluate(theirs)["perplexity"], "reloaded"
                del theirs
            except Exception as e:  # noqa: BLE001 - the runner's own score stands in, and the note says why
                ppl, how = r["perplexity"], f"scored in its process (reload failed: {type(e).__name__})"
            table.notes.append(f"llm-compressor {r['llmcompressor']} {method} g{g}: perplexity {how}; in its own process "
                               f"before saving {r['perplexity']:.4f}; settings {r.get('gptq', 'defaults')}")
            add(f"llm-compressor {r['llmcompressor']}", f"{modifier} W4A16_ASYM group_size={g}", g, ppl,
                file_bits(out, weights), r["seconds"])

    if importlib.util.find_spec("llama_cpp") is None:
        table.notes.append("llama.cpp rows skipped: needs llama-cpp-python")
    elif types:
        sys.path.insert(0, str(HERE))
        f32 = save_gguf(tmp_path / "f32.gguf", wl.model, float_type="f32").path
        prompt = tmp_path / "prompt.json"
        prompt.write_text(json.dumps(wl._chunks[0][0][:16].tolist()))
        for name in types:
            gguf = tmp_path / f"llama-{name}.gguf"
            q, seconds = _json_run([sys.executable, str(HERE / "llama_cpp_logits.py"), "quantize", "--model", str(f32),
                                    "--out", str(gguf), "--ftype", str(FTYPES[name]), "--threads", "2"])
            if q["status"] == "ok":
                q, _ = _json_run([sys.executable, str(HERE / "llama_cpp_logits.py"), "score", "--model", str(gguf),
                                  "--chunks", str(tmp_path / "chunks.json"), "--prompt-ids", str(prompt),
                                  "--new-tokens", "1", "--threads", "1"])
            ok = q["status"] == "ok"
            add(f"llama.cpp {q.get('version', '')}".strip(), f"llama_model_quantize {name} (its logits)", None,
                q["perplexity"] if ok else None, file_bits(gguf, weights) if ok else None, seconds if ok else None,
                q["status"])
    table.notes.append(f"seconds: quantization wall time on {os.cpu_count()} CPUs, load average "
                       f"{os.getloadavg()[0]:.1f} at the end (shared machine): indicative only")
    print("\n| engine | setting | group | perplexity | vs fp32 | bits/weight | seconds |\n|---|---|---|---|---|---|---|",
          file=sys.stderr)
    for row in table.rows:
        p, b, s = row.get("perplexity"), row.get("bits_per_weight"), row.get("seconds")
        print(f"| {row['engine']} | `{row['setting']}` | {row.get('group') or ''} | "
              f"{'' if p is None else f'{p:.3f}'} | {'' if p is None else f'{100 * (p / fp32 - 1):+.1f}%'} | "
              f"{'' if b is None else f'{b:.3f}'} | {'' if s is None else f'{s:.0f}'} | {row['status']}", file=sys.stderr)
    ours = [r for r in table.rows if r["engine"] == "optistack"]
    assert ours and all(math.isfinite(r["perplexity"]) for r in ours), "an optistack row has no perplexity"
