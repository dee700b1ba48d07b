"""Int4 rounding methods side by side on the bundled SmolLM2-135M: perplexity and pass time.

    python benchmarks/gptq_quality.py [--groups 64,128] [--zero-grids integer,float]
        [--methods rtn,awq,gptq,awq+gptq] [--chunks 8] [--gptq-options act_order=true] [--awq-options judge_z=0]

For every group size and zero-point grid, each method quantizes a fresh copy of the fp32 model and is
scored on the workload's perplexity (8 chunks of 512 tokens of evaluation text by default; calibration
uses the workload's calibration text, never the evaluation text):

- `rtn`: `rtn-int4` (round to nearest, no data);
- `awq`: `awq` (activation-aware scales, clipping, round to nearest);
- `gptq`: `gptq` (Hessian-based error-correcting rounding);
- `awq+gptq`: `awq{quantize=false},gptq`: AWQ's scales folded (judged by GPTQ's rounding on held-out
  calibration sequences, `rounding=auto`), GPTQ's rounding;
- `awq+gptq-rtn-judged` (not in the default list): the same with AWQ's scales judged by round-to-nearest
  (`rounding=rtn`, the default before 2026-12-06).

SmolLM2's fp32 weights are the dequantized Q4_1 (group 32, asymmetric) of its GGUF, so a group-32
asymmetric grid is lossless on it by construction: compare at groups 64 and 128. Pass seconds are wall
time of the passes alone (perplexity evaluation excluded) on this machine, as loaded as it is; the
load average is printed with the table. The table is printed as markdown at the end.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

METHODS = {
    "rtn": "rtn-int4{{group_size={g},zero_grid={z}}}",
    "awq": "awq{{group_size={g},zero_grid={z}{aextra}}}",
    "gptq": "gptq{{group_size={g},zero_grid={z}{extra}}}",
    "awq+gptq": "awq{{group_size={g},zero_grid={z},quantize=false{aextra}}},gptq{{group_size={g},zero_grid={z}{extra}}}",
    "awq+gptq-rtn-judged": "awq{{group_size={g},zero_grid={z},quantize=false,rounding=rtn{aextra}}},"
                           "gptq{{group_size={g},zero_grid={z}{extra}}}",
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_pipeline(text: str, model, ctx) -> tuple[object, float]:
    """(quantized model, seconds in the passes)."""
    from optistack.core.pipeline import Pipeline

    seconds = 0.0
    for p in Pipeline.parse(text).passes:
        start = time.perf_counter()
        result = p.apply(model, ctx)
        model = result.model
        seconds += time.perf_counter() - start
        checked = {k: v for k, v in result.info.items() if k.startswith("awq_")}
        if checked:  # what gptq's check of AWQ's scales decided (awq_model_check.py, awq_check.py)
            print(f"    {p.name}: {checked}", flush=True)
    return model, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--zero-grids", default="integer,float")
    ap.add_argument("--methods", default="rtn,awq,gptq,awq+gptq")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of 512 tokens")
    ap.add_argument("--gptq-options", default="", help="extra gptq options, e.g. act_order=true")
    ap.add_argument("--awq-options", default="", help="extra awq options, e.g. judge_z=0")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optistack.core.pass_protocol import PassContext
    from optistack.workloads import load

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    extra = f",{args.gptq_options}" if args.gptq_options else ""
    aextra = f",{args.awq_options}" if args.awq_options else ""
    wl = load("smollm2", ppl_chunks=args.chunks)
    ctx = PassContext(workload=wl)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    fp32 = wl.evaluate(wl.model)["perplexity"]
    print(f"fp32 perplexity {fp32:.3f} ({wl.eval_tokens} tokens)", flush=True)
    rows = []
    for g in (int(x) for x in args.groups.split(",")):
        for z in args.zero_grids.split(","):
            for method in methods:
                text = METHODS[method].format(g=g, z=z, extra=extra, aextra=aextra)
                model, seconds = run_pipeline(text, copy.deepcopy(wl.model), ctx)
                ppl = wl.evaluate(model)["perplexity"]
                del model
                opts = [o for o, on in ((args.gptq_options, "gptq" in method), (args.awq_options, "awq" in method)) if o and on]
                label = f"{method} ({'; '.join(opts)})" if opts else method
                rows.append((label, g, z, ppl, seconds, text))
                print(f"  {label:19s} g{g:<4d} {z:8s} perplexity {ppl:8.3f} ({100 * (ppl / fp32 - 1):+6.1f}%) "
                      f"pass {seconds:6.1f} s   {text}", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print("| method | group | zero grid | perplexity | vs fp32 | pass seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 | | | {fp32:.2f} | | |")
    for method, g, z, ppl, seconds, _ in rows:
        print(f"| {method} | {g} | {z} | {ppl:.2f} | {100 * (ppl / fp32 - 1):+.1f}% | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
