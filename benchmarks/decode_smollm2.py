"""SmolLM2-135M decode tokens/s and TTFT, eager fp32 against optistack pipelines, side by side.

    python benchmarks/decode_smollm2.py                         # eager vs the default chain
    python benchmarks/decode_smollm2.py --pipelines "rtn-int4{head=int8},fuse-kernels" "awq{head=int8},..."
    python benchmarks/decode_smollm2.py --batch 1,4 --repeats 5 --check --ppl --profile

Every variant is built from the same loaded model (a deep copy each), warmed up once (that first
call is where `compile` compiles: reported as compile seconds, apart from the timed runs), then the
variants are timed interleaved (eager, chain 1, chain 2, eager, ...) `--repeats` times, so machine
drift hits all of them alike; the table gives medians and the ratio to eager. `--check` decodes the
same prompt with each chain and with the chain minus its `compile` step (a chain with `decode-engine`:
with the same model's own decode loop) and reports whether the tokens are identical; `--ppl` adds the
workload's perplexity; `--profile` prints where one decode step's time goes (torch.profiler, top ops)
for each variant. Writes JSON with `--json`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

DEFAULT_CHAIN = ("rtn-int4{head=int8},fuse-kernels,kv-cache{impl=static},"
                 "compile{freezing=true,cpp_wrapper=true}")


def build(text: str, workload, model):
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    if text == "eager":
        return model, 0.0
    start = time.perf_counter()
    out = Pipeline.parse(text).apply(copy.deepcopy(model), PassContext(workload=workload)).model
    return out, time.perf_counter() - start


def without_compile(text: str) -> str:
    from optistack.core.pipeline import Pipeline

    kept = [p for p in Pipeline.parse(text) if p.name != "compile"]
    return str(Pipeline(kept)) if kept else "eager"


def prompt_batch(workload, batch: int):
    import torch

    base = workload._gen_prompt
    rows = [torch.roll(base, shifts=7 * i, dims=1) for i in range(batch)]  # distinct rows, same length
    return torch.cat(rows, dim=0)


def profile_step(model, prompt, tokens: int = 16) -> str:
    from torch.profiler import ProfilerActivity, profile

    from optistack.generation import greedy_decode

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        greedy_decode(model, prompt, tokens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipelines", nargs="+", default=[DEFAULT_CHAIN])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", default="1", help="comma list of batch sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eager", action="store_true", help="leave out the fp32 eager baseline")
    ap.add_argument("--check", action="store_true", help="tokens identical to the chain without compile")
    ap.add_argument("--ppl", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from optistack.generation import greedy_decode
    from optistack.workloads import load

    torch.set_num_threads(args.threads)
    workload = load("smollm2")
    names = ([] if args.no_eager else ["eager"]) + list(args.pipelines)
    models, results = {}, {}
    for name in names:
        model, apply_s = build(name, workload, workload.model)
        prompt = prompt_batch(workload, 1)
        start = time.perf_counter()
        first = greedy_decode(model, prompt, 2)  # the first call compiles (when the chain compiles)
        first_s = time.perf_counter() - start
        models[name] = model
        results[name] = {"apply_s": round(apply_s, 2), "first_call_s": round(first_s, 2), "runs": {}}
        print(f"built {name}: apply {apply_s:.1f} s, first call {first_s:.1f} s", flush=True)
        del first
    for batch in [int(b) for b in args.batch.split(",")]:
        prompt = prompt_batch(workload, batch)
        for name in names:
            greedy_decode(models[name], prompt, 4)  # warm-up at this batch size (may recompile)
        for _ in range(args.repeats):
            for name in names:
                m = greedy_decode(models[name], prompt, args.tokens).metrics()
                runs = results[name]["runs"].setdefault(str(batch), {"tokens_per_s": [], "ttft_ms": []})
                runs["tokens_per_s"].append(m["tokens_per_s"] * batch)
                runs["ttft_ms"].append(m["ttft_ms"])
                print(f"  batch {batch}: {m['tokens_per_s'] * batch:8.1f} tokens/s  TTFT {m['ttft_ms']:7.1f} ms  "
                      f"{name}", flush=True)
    print(f"\nSmolLM2-135M, {args.tokens} new tokens after a {workload._gen_prompt.shape[1]}-token prompt, "
          f"{args.threads} threads, medians of {args.repeats} interleaved runs (tokens/s counts every row of a batch)")
    for batch in args.batch.split(","):
        base = results.get("eager", {}).get("runs", {}).get(batch)
        print(f"\nbatch {batch}")
        for name in names:
            r = results[name]["runs"][batch]
            tps, ttft = statistics.median(r["tokens_per_s"]), statistics.median(r["ttft_ms"])
            r.update({"median_tokens_per_s": tps, "median_ttft_ms": ttft})
            ratio = f"  ({tps / statistics.median(base['tokens_per_s']):.2f}x eager)" if base and name != "eager" else ""
            print(f"  {tps:8.1f} tokens/s  TTFT {ttft:7.1f} ms{ratio}  {name}")
    prompt = prompt_batch(workload, 1)
    if args.check:
        for name in args.pipelines:
            ours = greedy_decode(models[name], prompt, args.tokens).tokens
            if "decode-engine" in name:  # the engine against the same model's own decode loop
                ref_text = "the model's own loop"
                ref = greedy_decode(models[name], prompt, args.tokens, use_strategy=False).tokens
            else:
                ref_text = without_compile(name)
                if ref_text == name:
                    continue
                ref_model = models.get(ref_text) or build(ref_text, workload, workload.model)[0]
                ref = greedy_decode(ref_model, prompt, args.tokens).tokens
            same = bool(torch.equal(ours, ref))
            first_diff = None if same else int((ours != ref).nonzero()[0, -1])
            results[name]["token_identical_to_uncompiled"] = same
            print(f"token-identical to '{ref_text}' for {args.tokens} tokens: {same}"
                  + ("" if same else f" (first difference at token {first_diff})"))
    if args.ppl:
        for name in names:
            results[name]["perplexity"] = workload.evaluate(models[name])["perplexity"]
            print(f"perplexity {results[name]['perplexity']:.3f}  {name}")
    if args.profile:
        for name in names:
            print(f"\n--- where a decode step's time goes: {name}\n{profile_step(models[name], prompt)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tokens": args.tokens, "threads": args.threads, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
