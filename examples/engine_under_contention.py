"""The decode engine beside a busy process: its team of threads shrinks while held up, and grows back.

    HF_HUB_OFFLINE=1 python examples/engine_under_contention.py              # about a minute on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/engine_under_contention.py --tokens 64 --hogs 2

A call of the engine (csrc/cpu/llama_decode.cpp) is ~300 barrier phases for SmolLM2, its work cut in equal
shares between the threads. When another process holds one of the cores, a thread waits at every barrier for a
partner that is not running: on 2 cores, 2 threads decode several times slower than 1. The engine measures
the work its threads did (CPU time less spinning) over 100 ms windows of calls and runs one thread fewer
while a window says a smaller team would be clearly faster; after a hold it tries a thread more
(csrc/cpu/llama_team.h, docs/decoding.md, "Under contention"). Rows compute the same bits on any team, so
the tokens do not change.

Prints decode tokens/s with the policy off (torch's thread count always, as `OPTISTACK_ENGINE_THREADS=fixed`
makes it) and on, quiet and beside `--hogs` busy processes, and checks the tokens are the same every time.
"""
import argparse
import copy
import subprocess
import sys
import time

import torch

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=96)
parser.add_argument("--hogs", type=int, default=1, help="busy processes beside the engine")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)

wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
result = Pipeline.parse("rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine").apply(
    copy.deepcopy(wl.model), PassContext(workload=wl))
strategy = getattr(result.model, "optistack_decode", None)
if not result.modified or strategy is None:
    raise SystemExit(f"the engine did not apply here: {result.info}")
runtime = strategy.weights.runtime(1, 128 + args.tokens)
TEXT = "The with statement is used to"
prompt = torch.tensor(wl.tokenizer(TEXT)["input_ids"])


def decode(adaptive: bool) -> tuple[float, list[int], float]:
    """Greedy tokens after the prompt: tokens/s, the tokens, and the share of calls made with a smaller team."""
    runtime.adaptive_threads = adaptive
    runtime.impl.set_length(0, 0)
    n = len(prompt)
    logits = runtime.forward(prompt, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.tensor([n - 1]))
    tokens, smaller = [int(logits.argmax())], 0
    start = time.perf_counter()
    for i in range(args.tokens - 1):
        logits = runtime.forward(torch.tensor(tokens[-1:]), torch.zeros(1, dtype=torch.long), torch.tensor([n + i]),
                                 torch.zeros(1, dtype=torch.long))
        tokens.append(int(logits.argmax()))
        smaller += runtime.team_threads < args.threads
    return (args.tokens - 1) / (time.perf_counter() - start), tokens, smaller / (args.tokens - 1)


reference = decode(False)[1]
print(f"{args.threads} threads allowed; decode tokens/s, policy off -> on (share of calls on a smaller team)")
for hogs in (0, args.hogs):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        time.sleep(0.2 if hogs else 0)
        for rnd in range(2):
            off, t_off, _ = decode(False)
            on, t_on, share = decode(True)
            assert t_off == reference and t_on == reference, "the team's size changed the tokens"
            print(f"  {hogs} busy process(es), round {rnd + 1}: {off:6.1f} -> {on:6.1f} tokens/s ({share:.0%})")
    finally:
        for p in procs:
            p.kill()
            p.wait()
print("tokens identical in every run: True")
print(TEXT + wl.tokenizer.decode(reference))
