"""Four threads calling `generate()` on one optimized SmolLM2 for a minute: every output must equal its
single-caller output, and nothing may crash.

    python benchmarks/generate_concurrency.py                         # 4 threads, 60 s, the RTN chain
    python benchmarks/generate_concurrency.py --threads 8 --seconds 120 --chain "@llm-decode"

Eight prompts of 8..300 tokens cut from the workload's evaluation text, 16..64 greedy tokens each, are
decoded once alone first; then every thread loops over them (each from another starting point) until
the time is up. Prints calls, mismatches, errors and the tokens/s all threads made together; exits 1 on
any mismatch or error.
"""
from __future__ import annotations

import argparse
import copy
import sys
import threading
import time

CHAIN = "rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", default=CHAIN)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    import torch

    import optistack as ost
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    torch.set_num_threads(2)
    wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
    model = Pipeline.parse(args.chain).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
    ids = list(wl.eval_token_ids())
    ids = (ids * (1 + 700 // max(1, len(ids))))[:700]  # enough text for the longest prompt
    asks = [(torch.tensor([ids[37 * i: 37 * i + 8 + 41 * i]]), 16 + 6 * i) for i in range(8)]
    kw = dict(do_sample=False, eos_token_id=[], pad_token_id=0)
    with torch.inference_mode():
        alone = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, **kw) for p, n in asks]
    print(f"served by: {model.generate.last}", flush=True)
    calls, tokens, mismatches, errors = [0] * args.threads, [0] * args.threads, [], []

    def caller(k: int) -> None:
        end, i = time.perf_counter() + args.seconds, k
        while time.perf_counter() < end:
            p, n = asks[i % len(asks)]
            try:
                with torch.inference_mode():
                    got = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, **kw)
            except Exception as exc:
                errors.append(f"thread {k}: {type(exc).__name__}: {exc}")
                return
            if not torch.equal(got, alone[i % len(asks)]):
                mismatches.append((k, i % len(asks)))
            calls[k] += 1
            tokens[k] += n
            i += 3

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(args.threads)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    print(f"{args.threads} threads, {wall:.1f} s: calls per thread {calls}, {sum(tokens) / wall:.1f} tokens/s in all, "
          f"{len(mismatches)} outputs differing from the single caller's, {len(errors)} errors")
    for line in errors[:5]:
        print("  ", line)
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main())
