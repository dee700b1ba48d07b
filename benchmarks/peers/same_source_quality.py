"""Same-source quality: llama.cpp's own 4-bit quantizations of the fp32 SmolLM2 beside optistack's, on the
same evaluation token ids, each scored from its own engine's logits.

    python benchmarks/peers/same_source_quality.py [--chunks 4] [--threads 1] [--types Q4_0,Q4_K_M,Q4_1]
        [--pipelines "awq{zero_grid=float,group_size=64};gptq{zero_grid=integer,group_size=64}"]

The fp32 model (the bundled SmolLM2's dequantized Q4_1) is written as an F32 GGUF by `save_gguf`;
llama.cpp's `llama_model_quantize` makes each `--types` file from it, and llama.cpp scores it
(`llama_cpp_logits.py`: every position's logits, each 512-token chunk in a fresh context). optistack's
pipelines run on the same fp32 model and are scored by the model's own forward on the same chunks; each is
also written by `save_gguf` so both sides report bits per parameter the same way: GGUF file bytes x 8 /
the model's parameter count (embedding and head included; SmolLM2 ties them, so they are counted once).
Mind: SmolLM2's fp32 is the dequantized Q4_1 of its GGUF, so a group-32 asymmetric grid that lands on Q4_1's
is nearly lossless here (llama.cpp's Q4_1 included); compare at other grids. Needs llama-cpp-python.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17}
PIPELINES = "awq{zero_grid=float,group_size=64};gptq{zero_grid=integer,group_size=64};rtn-int4{zero_grid=integer,group_size=64}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q4_1")
    ap.add_argument("--pipelines", default=PIPELINES)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    import torch
    from test_gguf_roundtrip import _our_perplexity, _run

    from optistack.checkpoints import save_gguf
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.workloads.smollm2 import SmolLM2Workload

    torch.set_num_threads(2)
    wl = SmolLM2Workload(ppl_chunk=512, ppl_chunks=args.chunks)
    chunks = [c[0].tolist() for c in wl._chunks[: args.chunks]]  # what its perplexity metric scores
    params = sum(p.numel() for p in {id(p): p for p in wl.model.parameters()}.values())
    tmp = Path(tempfile.mkdtemp(prefix="same-source-"))
    (tmp / "chunks.json").write_text(json.dumps(chunks))
    (tmp / "prompt.json").write_text(json.dumps(chunks[0][:16]))
    rows = []

    def bpw(path: Path) -> float:
        return path.stat().st_size * 8 / params

    f32 = save_gguf(tmp / "f32.gguf", wl.model, float_type="f32").path
    rows.append(("fp32 (optistack's forward)", "F32", bpw(f32), _our_perplexity(wl.model, chunks), None))
    for name in [t for t in args.types.split(",") if t]:
        out = tmp / f"llama-{name}.gguf"
        q = _run("llama_cpp_logits.py", "quantize", "--model", str(f32), "--out", str(out), "--ftype",
                 str(FTYPES[name]), "--threads", "2")
        if q["status"] != "ok":
            rows.append((f"llama.cpp {name}", name, float("nan"), float("nan"), q["status"]))
            continue
        start = time.perf_counter()
        r = _run("llama_cpp_logits.py", "score", "--model", str(out), "--chunks", str(tmp / "chunks.json"),
                 "--prompt-ids", str(tmp / "prompt.json"), "--new-tokens", "1", "--threads", args.threads)
        rows.append((f"llama.cpp {name} (its own quantizer, its logits)", name, bpw(out), r.get("perplexity", float("nan")),
                     None if r["status"] == "ok" else r["status"]))
        print(f"  scored llama.cpp {name} in {time.perf_counter() - start:.0f} s", flush=True)
    for text in [t for t in args.pipelines.split(";") if t.strip()]:
        start = time.perf_counter()
        model = Pipeline.parse(text).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
        seconds = time.perf_counter() - start
        written = save_gguf(tmp / "ours.gguf", model)
        rows.append((f"optistack {text} ({seconds:.0f} s; its forward)", written.file_type, bpw(written.path),
                     _our_perplexity(model, chunks), None))
        del model
    base = rows[0][3]
    print(f"\nSmolLM2-135M, {len(chunks)} x {len(chunks[0])} evaluation tokens, same ids on both sides; "
          f"bits per parameter = GGUF file bytes x 8 / {params:,} parameters")
    print("| model | GGUF type | bits/param | perplexity | vs fp32 |\n|---|---|---|---|---|")
    for label, kind, bits, ppl, status in rows:
        if status:
            print(f"| {label} | {kind} | | | {status} |")
        else:
            print(f"| {label} | {kind} | {bits:.2f} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
