"""LoadGen Offline throughput of the engine's continuous batching at max_batch 1 against 8 (issue 22's bar).

    python benchmarks/engine_offline.py [--chain TEXT] [--rounds 2] [--samples 32] [--panels auto|on|off|ab]

The same requests (the smollm2 workload's text, seed 0, `ScenarioOptions`' lengths: prompts 32-254 tokens, mean
159.5; 17-128 new tokens, mean 71.5) go to
`EngineBackend.from_model(model, max_batch=B, max_context=320)` through `measure_offline` for B = 1 and 8,
interleaved per round; every round's tokens/s is printed, then the medians and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import statistics

CHAIN = "rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine{check_prompts=0}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", default=CHAIN)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--panels", choices=["auto", "on", "off", "ab"], default="auto",
                    help="the engine's int4 panels (auto: the backend's default; ab: both, interleaved)")
    args = ap.parse_args()
    import torch

    import optistack as ost
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.serving.engine_backend import EngineBackend
    from optistack.serving.loadgen_scenario import ScenarioOptions, measure_offline, warm_up
    from optistack.serving.samples import samples_from_workload

    torch.set_num_threads(2)
    wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
    model = Pipeline.parse(args.chain).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
    opts = ScenarioOptions(samples=args.samples, server_samples=min(12, args.samples))
    samples = samples_from_workload(wl, args.samples, seed=0, input_tokens=opts.input_tokens,
                                    output_tokens=opts.output_tokens)
    modes = {"auto": [None], "on": [True], "off": [False], "ab": [False, True]}[args.panels]
    res: dict[tuple, list[float]] = {(p, mb): [] for p in modes for mb in (1, 8)}
    for rnd in range(args.rounds):
        for p, mb in res:
            be = EngineBackend.from_model(model, max_batch=mb, max_context=320, panels=p)
            warm_up(be, samples[:2])
            run = measure_offline(be, samples, ScenarioOptions(samples=args.samples, server_samples=opts.server_samples,
                                                               max_batch=mb))
            be.close()
            res[p, mb].append(run.tokens_per_s)
            print(f"round {rnd + 1} panels {p} max_batch {mb}: {res[p, mb][-1]:.1f} tokens/s ({be.steps} engine calls)",
                  flush=True)
    for p in modes:
        b1, b8 = statistics.median(res[p, 1]), statistics.median(res[p, 8])
        print(f"medians, panels {p}: max_batch 1 {b1:.1f}, max_batch 8 {b8:.1f} tokens/s: {b8 / b1:.2f}x")


if __name__ == "__main__":
    main()
