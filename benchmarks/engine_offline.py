"""LoadGen Offline throughput of the engine's continuous batching at max_batch 1 against 8 (issue 22's bar).

    python benchmarks/engine_offline.py [--chain TEXT] [--rounds 2] [--samples 32] [--panels auto|on|off|ab]
        [--order longest|loadgen|ab] [--kv float16|int8|float32]

The same requests (the smollm2 workload's text, seed 0, `ScenarioOptions`' lengths: prompts 32-254 tokens, mean
159.5, 5105 in all; 17-128 new tokens, mean 71.5, 2287 in all) go to
`EngineBackend.from_model(model, max_batch=B, max_context=C)` through `measure_offline` for B = 1 and 8,
interleaved per round, C the longest request's prompt + new tokens rounded up to 64 (before 2026-12-07 it was 320,
and the 3 of 32 requests longer than that failed at submission, uncounted); every round's tokens/s is printed
(with the requests that failed, if any), then the medians and their ratio. `--order`: Offline submits the samples
longest first (the default, loadgen_sut.py) or in LoadGen's order; `ab` runs both. `--kv`: the engine's KV cache
type (default: EngineBackend's, int8 where the decode-engine step was not told one; float16 before 2026-12-07).
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
    ap.add_argument("--order", choices=["longest", "loadgen", "ab"], default="longest",
                    help="Offline's submission order (ab: both, interleaved)")
    ap.add_argument("--kv", choices=["float16", "int8", "float32"], default=None, help="the KV cache's type")
    args = ap.parse_args()
    import torch

    import optistack as ost
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.serving.engine_backend import EngineBackend
    from optistack.serving.loadgen_scenario import ScenarioOptions, check_samples, measure_offline, warm_up
    from optistack.serving.samples import samples_from_workload

    torch.set_num_threads(2)
    wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
    model = Pipeline.parse(args.chain).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
    opts = ScenarioOptions(samples=args.samples, server_samples=min(12, args.samples))
    samples = samples_from_workload(wl, args.samples, seed=0, input_tokens=opts.input_tokens,
                                    output_tokens=opts.output_tokens)
    context = -(-max(s.context for s in samples) // 64) * 64
    modes = {"auto": [None], "on": [True], "off": [False], "ab": [False, True]}[args.panels]
    orders = {"longest": [True], "loadgen": [False], "ab": [False, True]}[args.order]
    res: dict[tuple, list[float]] = {(p, o, mb): [] for p in modes for o in orders for mb in (1, 8)}
    for rnd in range(args.rounds):
        for p, o, mb in res:
            be = EngineBackend.from_model(model, max_batch=mb, max_context=context, panels=p, kv=args.kv)
            check_samples(be, samples)
            warm_up(be, samples[:2])
            run = measure_offline(be, samples, ScenarioOptions(samples=args.samples, server_samples=opts.server_samples,
                                                               max_batch=mb), longest_first=o)
            be.close()
            res[p, o, mb].append(run.tokens_per_s)
            print(f"round {rnd + 1} panels {p} {'longest first' if o else 'loadgen order'} max_batch {mb}: "
                  f"{res[p, o, mb][-1]:.1f} tokens/s ({be.steps} engine calls, {run.failed} failed)", flush=True)
    for p in modes:
        for o in orders:
            b1, b8 = statistics.median(res[p, o, 1]), statistics.median(res[p, o, 8])
            ratios = [b / a for a, b in zip(res[p, o, 1], res[p, o, 8])]
            print(f"medians, panels {p}, {'longest first' if o else 'loadgen order'}: max_batch 1 {b1:.1f}, max_batch 8 "
                  f"{b8:.1f} tokens/s: {b8 / b1:.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
