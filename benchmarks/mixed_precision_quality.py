"""`mixed-precision` under a bits-per-weight budget against uniform int4 on the bundled SmolLM2-135M.

    python benchmarks/mixed_precision_quality.py [--bits 4.5] [--rows rtn-g64,mp-rtn,gptq-g64,mp,mp-no-g32]
        [--chunks 8] [--zero-grid integer]

Each row quantizes a fresh copy of the fp32 model and is scored on the workload's perplexity (8 chunks of
512 evaluation tokens by default; calibration uses the workload's calibration text, never the
evaluation text). Bits per weight are the pass's own `bits_per_weight`: stored bytes of the quantized
layers' weight buffers (codes, scales, zeros; bias excluded) over their real weights, the same count for
every row; `lm_head` is left float in every row (tied to the embedding on SmolLM2).

SmolLM2's fp32 weights are the dequantized Q4_1 (group 32, asymmetric, float minimum) of its GGUF, so
int4 g32 sits close to its original grid and is unusually good on this model: rows with and without
int4-g32 among the choices are printed. The table is printed as markdown at the end, with the predicted loss rise of each
mixed-precision result beside the measured one (log of the perplexity ratio). Each row is a
fresh pass: ~15-20 minutes a row on a busy 2-core machine (the gradient pass and GPTQ dominate).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

ROWS = {
    "rtn-g64": "rtn-int4{{group_size=64,zero_grid={z}}}",
    "gptq-g64": "gptq{{group_size=64,zero_grid={z}}}",
    "gptq-g128": "gptq{{group_size=128,zero_grid={z}}}",
    "mp-rtn": "mixed-precision{{bits={b},method=rtn,zero_grid={z}}}",
    "mp": "mixed-precision{{bits={b},zero_grid={z}}}",
    "mp-untied": "mixed-precision{{bits={b},zero_grid={z},tie=false}}",
    "mp-no-g32": "mixed-precision{{bits={b},zero_grid={z},choices=int4-g256+int4-g128+int4-g64+int8}}",
    "mp-engine": "mixed-precision{{bits={b},zero_grid={z},choices=int4-g256+int4-g128+int4-g64}}",
    "mp-output": "mixed-precision{{bits={b},zero_grid={z},sensitivity=output}}",
}


def run(text: str, model, ctx) -> tuple[object, dict, float]:
    """(quantized model, the last pass's info, seconds in the passes)."""
    from optistack.core.pipeline import Pipeline

    start, info = time.perf_counter(), {}
    for p in Pipeline.parse(text).passes:
        result = p.apply(model, ctx)
        model, info = result.model, result.info
    return model, info, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=float, default=4.5)
    ap.add_argument("--rows", default="rtn-g64,mp-rtn,gptq-g64,mp,mp-no-g32")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of 512 tokens")
    ap.add_argument("--zero-grid", default="integer", choices=("integer", "float"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optistack.core.pass_protocol import PassContext
    from optistack.workloads import load

    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    wl = load("smollm2", ppl_chunks=args.chunks)
    ctx = PassContext(workload=wl)
    print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    fp32 = wl.evaluate(wl.model)["perplexity"]
    print(f"fp32 perplexity {fp32:.3f} ({wl.eval_tokens} tokens)", flush=True)
    table = []
    for row in rows:
        text = ROWS[row].format(b=args.bits, z=args.zero_grid)
        model, info, seconds = run(text, copy.deepcopy(wl.model), ctx)
        ppl = wl.evaluate(model)["perplexity"]
        del model
        predicted = info.get("predicted_loss_increase")
        counts = ", ".join(f"{k.removeprefix('layers_')} {v}" for k, v in info.items()
                           if k.startswith(("layers_int4", "layers_int8", "layers_float")) and v)
        table.append((row, text, info.get("bits_per_weight"), ppl, predicted, counts, seconds))
        print(f"  {row:10s} bits {info.get('bits_per_weight')} perplexity {ppl:8.3f} "
              f"({100 * (ppl / fp32 - 1):+6.1f}%) predicted dloss {predicted} measured {math.log(ppl / fp32):.4f} "
              f"[{counts}] pass {seconds:.0f} s   {text}", flush=True)
        if row.startswith("mp"):
            for k, v in info.items():
                if k.startswith("choice "):
                    print(f"      {k.removeprefix('choice ')}: {v}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print("| method | pipeline | avg bits/weight | perplexity | vs fp32 | loss rise: predicted / measured | layers |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 | | 32 | {fp32:.2f} | | | |")
    for row, text, bits, ppl, predicted, counts, _ in table:
        pred = f"{predicted:.4f} / {math.log(ppl / fp32):.4f}" if predicted is not None else ""
        print(f"| {row} | `{text}` | {bits} | {ppl:.2f} | {100 * (ppl / fp32 - 1):+.1f}% | {pred} | {counts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
