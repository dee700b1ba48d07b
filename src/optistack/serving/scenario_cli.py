"""`optistack run --scenario server`: after the pipeline, the workload's original model on `StockBackend` against
the optimized model on `serving.backends_for(model)`, both under MLPerf LoadGen (see loadgen_scenario.py).

The result goes into the report's `scenario` section (schema `optistack.scenario/1`), is printed as two tables
beside the report, and `--scenario-plot` draws latency against load.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from .backend import ServingError

SCENARIOS = ("server",)
# flag -> (ScenarioOptions field, type, help); all default to None so a flag given without --scenario is caught
_FLAGS = {
    "--qps-max": ("qps_max", float, "highest offered QPS searched (default: the Offline run's requests/s)"),
    "--qps-min": ("qps_min", float, "lowest offered QPS searched (default: qps-max / 8)"),
    "--ttft-limit": ("ttft_limit_s", float, "p99 time-to-first-token limit, seconds (default 2.0, MLPerf Llama-3.1-8B)"),
    "--tpot-limit": ("tpot_limit_s", float, "p99 time-per-output-token limit, seconds (default 0.1, MLPerf Llama-3.1-8B)"),
    "--scenario-samples": ("samples", int, "requests built from the workload's data (default 16)"),
    "--scenario-run-samples": ("server_samples", int, "requests per Server run (default 12)"),
    "--scenario-run-seconds": ("max_run_s", float, "a Server run stops issuing after this many seconds (default 30)"),
    "--scenario-offline-timeout": ("offline_timeout_s", float, "cancel Offline requests after this (default 300 s)"),
    "--scenario-steps": ("search_steps", int, "Server runs in the QPS search (default 4)"),
    "--scenario-seed": ("seed", int, "seed of the requests and of LoadGen's arrival schedule (default 0)"),
    "--scenario-max-batch": ("max_batch", int, "requests batched together by each backend (default 8)"),
    "--scenario-logs": ("log_dir", str, "keep LoadGen's logs (mlperf_log_summary.txt, _detail.txt) here, one folder a run"),
    "--scenario-input-tokens": ("input_tokens", str, "prompt lengths drawn from LO,HI tokens (default 32,512)"),
    "--scenario-output-tokens": ("output_tokens", str, "new tokens per request drawn from LO,HI (default 16,128)"),
}


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", choices=SCENARIOS, default=None,
                   help="after the pipeline, serve stock and optimized models under MLPerf LoadGen (causal LMs)")
    p.add_argument("--scenario-plot", default=None, help="write the latency-against-load PNG here (with --scenario)")
    for flag, (_, kind, text) in _FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=text)


def options_from_args(args: Any) -> Any:
    """ScenarioOptions from the flags (None when --scenario is not given); a scenario flag without --scenario,
    or a bad value, is one ServingError naming the flag."""
    given = {flag: getattr(args, _dest(flag), None) for flag in list(_FLAGS) + ["--scenario-plot"]}
    if getattr(args, "scenario", None) is None:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise ServingError(f"{stray[0]} applies only with --scenario server")
        return None
    from .loadgen_scenario import ScenarioOptions

    fields = {}
    for flag, (name, _, _) in _FLAGS.items():
        value = given[flag]
        if value is None:
            continue
        if name in ("input_tokens", "output_tokens"):
            value = _range(flag, value)
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            raise ServingError(f"{flag} must be a number > 0; got {value}")
        if isinstance(value, int) and value < (0 if name == "seed" else 1):
            raise ServingError(f"{flag} must be an integer >= {0 if name == 'seed' else 1}; got {value}")
        fields[name] = value
    if "samples" in fields and "server_samples" not in fields:
        fields["server_samples"] = min(fields["samples"], 12)
    try:
        return ScenarioOptions(**fields)
    except ServingError as exc:
        flag = next((f for f, (name, _, _) in _FLAGS.items() if name == str(exc).split(" ")[0]), None)
        raise ServingError(f"{flag}: {exc}" if flag else str(exc)) from None


def _range(flag: str, text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        lo, hi = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or hi is None or not 1 <= lo <= hi:
        raise ServingError(f"{flag} must be LO,HI with integers 1 <= LO <= HI (e.g. 32,512); got {text!r}")
    return lo, hi


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def check_workload(workload: Any, options: Any) -> None:
    """Before the pipeline runs: a causal LM, whose data gives requests that fit the model's positions."""
    if getattr(workload, "kind", None) != "causal-lm":
        raise ServingError(f"--scenario server needs a causal-LM workload; {getattr(workload, 'name', '?')!r} is "
                           f"{getattr(workload, 'kind', 'unknown')!r} (try --model smollm2 or smollm2-qa)")
    _context_for(_samples(workload, options), workload.model)


def _samples(workload: Any, options: Any) -> list[Any]:
    from .samples import samples_from_workload

    return samples_from_workload(workload, options.samples, seed=options.seed, input_tokens=options.input_tokens,
                                 output_tokens=options.output_tokens)


def _context_for(samples: Any, model: Any) -> int:
    """The context both backends are sized for: the longest sample, rounded up to 64, within the model's positions."""
    need = max(s.context for s in samples)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and need > limit:
        raise ServingError(f"the longest request needs {need} tokens but the model has {limit} positions; give "
                           "smaller --scenario-input-tokens / --scenario-output-tokens")
    rounded = -(-need // 64) * 64
    return min(rounded, limit) if isinstance(limit, int) else rounded


def run_server_scenario(workload: Any, original: Any, optimized: Any, options: Any, log: Any = None) -> Any:
    """Stock (original model, StockBackend) then optimized (`backends_for`), one at a time; the ScenarioResult."""
    from . import backends_for
    from .loadgen_scenario import ScenarioResult, run_scenario
    from .stock import StockBackend

    log = log or (lambda text: print(text, file=sys.stderr))
    samples = _samples(workload, options)
    tokenizer = getattr(workload, "tokenizer", None)
    context = _context_for(samples, original)
    info = {"source": getattr(workload, "name", "?"), "count": len(samples), "seed": options.seed,
            "prompt_tokens": [min(len(s.prompt_ids) for s in samples), max(len(s.prompt_ids) for s in samples)],
            "new_tokens": [min(s.max_new_tokens for s in samples), max(s.max_new_tokens for s in samples)],
            "stop_at_eos": False, "decoding": "greedy", "max_context": context}
    results, skipped = [], []
    for role, make in (("stock", lambda: StockBackend(original, tokenizer, max_batch=options.max_batch,
                                                      max_context=context, name="transformers continuous batching (original)")),
                       ("optimized", lambda: backends_for(optimized, tokenizer, max_batch=options.max_batch,
                                                          max_context=context))):
        try:
            backend = make()
        except ServingError as exc:
            skipped.append({"role": role, "reason": str(exc)})
            log(f"server scenario: {role} skipped: {exc}")
            continue
        log(f"server scenario: {role} on {backend.name}: Offline, then up to {options.search_steps} Server runs")
        try:
            results.append(run_scenario(backend, samples, options, role=role))
        finally:
            backend.close()
    if not results:
        raise ServingError("server scenario: no backend could run: " + "; ".join(s["reason"] for s in skipped))
    return ScenarioResult(options, info, tuple(results), extra={"skipped": skipped} if skipped else {})


def run_cli_scenario(args: Any, workload: Any, result: Any, options: Any) -> None:
    """After `optistack run`: measure, print the tables, put the section into the report, draw the plot."""
    from .scenario_render import print_scenario

    scenario = run_server_scenario(workload, result.original, result.model, options)
    d = scenario.to_dict()
    result.report.scenario = d
    print_scenario(d)
    for s in d.get("skipped", []):
        print(f"server scenario: {s['role']} not measured: {s['reason']}", file=sys.stderr)
    if getattr(args, "scenario_plot", None):
        from .scenario_plot import plot_scenario

        title = f"server scenario: {getattr(workload, 'name', '')} ({result.report.pipeline})"
        print(f"scenario plot: {plot_scenario(scenario, args.scenario_plot, title=title)}", file=sys.stderr)
