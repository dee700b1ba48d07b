"""Serve the original and the optimized SmolLM2 under MLPerf LoadGen: Offline throughput, then Server runs at
Poisson arrivals to find the highest QPS where p99 TTFT <= 2 s and p99 TPOT <= 100 ms (MLPerf's Llama-3.1-8B limits).

    HF_HUB_OFFLINE=1 python examples/server_scenario.py                          # @llm-decode, a few minutes a backend
    HF_HUB_OFFLINE=1 python examples/server_scenario.py --pipeline rtn-int4 --steps 3 --plot load.png

The same from the shell:  optistack run --model smollm2 --pipeline @llm-decode --scenario server --scenario-plot load.png
Any object keeping the `optistack.serving.backend.Backend` contract can take either side (`run_scenario`).
"""
from __future__ import annotations

import argparse
import json

import optistack as ost
from optistack.serving import backends_for
from optistack.serving.loadgen_scenario import ScenarioOptions, ScenarioResult, run_scenario
from optistack.serving.samples import samples_from_workload
from optistack.serving.scenario_plot import plot_scenario
from optistack.serving.scenario_render import print_scenario
from optistack.serving.stock import StockBackend


def main(argv: list[str] | None = None) -> ScenarioResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a causal-LM workload or model folder")
    parser.add_argument("--pipeline", default="@llm-decode", help="what to optimize with")
    parser.add_argument("--samples", type=int, default=16, help="requests built from the workload's text")
    parser.add_argument("--steps", type=int, default=4, help="Server runs in the QPS search")
    parser.add_argument("--ttft-limit", type=float, default=2.0)
    parser.add_argument("--tpot-limit", type=float, default=0.1)
    parser.add_argument("--qps-max", type=float, default=None, help="default: each backend's Offline requests/s")
    parser.add_argument("--plot", default=None, help="write the latency-against-load PNG here")
    parser.add_argument("--json", default=None, help="write the scenario's JSON (optistack.scenario/1) here")
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds in the pipeline's report")
    args = parser.parse_args(argv)

    workload = ost.workloads.load(args.model)
    timing = ost.TimingConfig(min_rounds=4, max_rounds=10, max_seconds=5.0) if args.quick else None
    result = ost.Pipeline.parse(args.pipeline).run(workload, timing=timing)
    result.report.print()

    options = ScenarioOptions(ttft_limit_s=args.ttft_limit, tpot_limit_s=args.tpot_limit, samples=args.samples,
                              server_samples=min(args.samples, 12), search_steps=args.steps, qps_max=args.qps_max)
    # the same requests for both: prompts of 32..512 tokens cut from the workload's evaluation text, 16..128 new tokens
    samples = samples_from_workload(workload, options.samples, seed=options.seed)
    context = -(-max(s.context for s in samples) // 64) * 64
    measured = []
    for role, make in (("stock", lambda: StockBackend(result.original, workload.tokenizer, max_context=context)),
                       ("optimized", lambda: backends_for(result.model, workload.tokenizer, max_context=context))):
        backend = make()  # one at a time: the two never share the cores
        try:
            measured.append(run_scenario(backend, samples, options, role=role))
        finally:
            backend.close()
    scenario = ScenarioResult(options, {"source": workload.name, "count": len(samples)}, tuple(measured))

    print_scenario(scenario.to_dict())
    for b in scenario.backends:
        print(f"{b.role}: max QPS within limits {b.max_qps} (searched {b.qps_range[0]:.3g}..{b.qps_range[1]:.3g}), "
              f"Offline {b.offline.loadgen['tokens_per_s']:.1f} tokens/s")
    if args.plot:
        print(f"plot: {plot_scenario(scenario, args.plot, title=f'{workload.name}: {args.pipeline} vs stock')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scenario.to_dict(), f, indent=2)
    return scenario


if __name__ == "__main__":
    main()
