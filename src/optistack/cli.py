"""`optistack` command line: demo, run, passes, presets, workloads, report, search, serve."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_PIPELINE = "identity,prune-structured{sparsity=0.5},int8-dynamic,compile"
DEMO_BUDGET = 0.01


def _timing(quick: bool):
    from .bench.timer import TimingConfig

    return TimingConfig(min_rounds=6, max_rounds=20, max_seconds=8.0) if quick else TimingConfig()


def _write_outputs(report, args) -> None:
    if getattr(args, "json", None):
        print(f"report JSON: {report.save(args.json)}", file=sys.stderr)
    if getattr(args, "markdown", None):
        Path(args.markdown).write_text(report.to_markdown())
    if getattr(args, "plot", None):
        print(f"plot: {report.plot(args.plot)}", file=sys.stderr)


def cmd_run(args) -> int:
    from .serving.scenario_cli import check_workload, options_from_args, run_cli_scenario
    from .wiring import run_pipeline
    from .workloads import load

    scenario = options_from_args(args)  # --scenario flags, before a model loads

    def make_workload():  # loaded by the wiring once the pipeline, budget and timing passed: a typo fails first
        loaded = load(args.model, data=args.data, task=args.task)
        if scenario is not None:
            check_workload(loaded, scenario)
        return loaded

    result = run_pipeline(args.pipeline, make_workload, max_accuracy_drop=args.max_accuracy_drop,
                          timing=_timing(args.quick))
    workload = result.workload
    result.report.print()
    if getattr(args, "verbose", False):
        _print_tracebacks(result.report)
    if scenario is not None:  # stock vs optimized under MLPerf LoadGen; the report gains its `scenario` section
        run_cli_scenario(args, workload, result, scenario)
    _write_outputs(result.report, args)
    if args.save:  # after the report: a model transformers cannot load still leaves the report written
        save_result(result, args.save, getattr(args, "save_format", "auto"))
    return 0


def save_result(result, path: str, save_format: str) -> None:
    """--save / --save-format: a Hugging Face folder (hf), one GGUF file llama.cpp runs (gguf), optistack's own
    folder (optistack: what `optistack serve` and `optistack.load_model` read, any pipeline), or auto: hf where
    that format holds the model (checked before a byte is written), else optistack's own, saying why."""
    from .checkpoints import CheckpointError, DestinationError

    if save_format == "gguf":
        print(f"saved (llama.cpp loadable): {result.save_gguf(path).summary()}", file=sys.stderr)
        return
    if save_format in ("hf", "auto"):
        try:
            print(f"saved (transformers / vLLM loadable): {result.save_pretrained(path)}", file=sys.stderr)
            return
        except CheckpointError as exc:
            if save_format == "hf" or isinstance(exc, DestinationError):  # the path, not the model: say so
                raise
            why = str(exc).split(": use result.save")[0].split("; use result.save")[0]
    else:
        why = None
    out = result.save(path)
    print(f"saved (optistack serve / optistack.load_model): {out}"
          + (f"; not a Hugging Face folder: {why}" if why else ""), file=sys.stderr)


def _print_tracebacks(report) -> None:
    """--verbose: the traceback of every failed step, after the report (the JSON keeps them too)."""
    from .bench.render.format import traceback_blocks

    for block in traceback_blocks(report):
        print(block, file=sys.stderr)


def cmd_demo(args) -> int:
    if args.pipeline is None and args.model == "minilm":  # the tour: presets, MiniLM, SmolLM2 through generate()
        from .demo import run_tour

        if args.tokens < 2:
            raise SystemExit(f"optistack: error: --tokens must be >= 2 (a first token and a decode rate); got {args.tokens}")
        args.timing = _timing(True)
        return run_tour(args)
    args.pipeline = DEMO_PIPELINE if args.pipeline is None else args.pipeline
    print(f"optistack demo: optimizing the bundled {args.model} with '{args.pipeline}', "
          f"accuracy budget {args.max_accuracy_drop:g}", file=sys.stderr)
    return cmd_run(args)


def cmd_passes(args) -> int:
    from .api import list_passes

    rows = list_passes()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # a bare install (no `report` extra): plain text, one pass a line
        for r in rows:
            avail = "available" if r["available"] else f"unavailable: {r['reason'] or ''}"
            print(f"{r['name']:<18} {'/'.join(r['takes'])} -> {r['gives'] or 'same'}  {avail}")
        return 0

    table = Table(title="optistack passes")
    for col in ("pass", "available here", "takes -> gives", "what it does"):
        table.add_column(col)
    for r in rows:
        # escape: reasons hold "pip install 'optistack[onnx]'", which rich would read as a style tag
        avail = "[green]yes[/]" if r["available"] else f"[yellow]no[/]: {escape(r['reason'] or '')}"
        forms = f"{'/'.join(r['takes'])} -> {r['gives'] or 'same'}"
        table.add_row(r["name"], avail, forms, escape(r["summary"] or ""))
    Console().print(table)
    return 0


def cmd_presets(args) -> int:
    from .presets import describe_presets, machine_features

    rows = describe_presets()
    if args.json:
        print(json.dumps({"features": sorted(machine_features()), "presets": rows}, indent=2))
        return 0
    print(f"this machine: {', '.join(sorted(machine_features())) or 'no listed features'}")
    for r in rows:
        print(f"\n{r['name']}: {r['summary']}\n  here ({r['chosen_for']}): {r['expansion']}\n    {r['why']}")
        for v in r["variants"]:
            when = "any machine" if v["when"] == "*" else v["when"]
            print(f"  {'>' if v['when'] == r['chosen_for'] else ' '} {when:<12} {v['pipeline']}")
    return 0


def cmd_workloads(args) -> int:
    from .core.registry import workload_names

    print("\n".join(workload_names()))
    return 0


def cmd_report(args) -> int:
    from .bench.report import Report

    report = Report.load(args.path)
    fmt = args.format
    if fmt == "png":
        out = args.output or str(Path(args.path).with_suffix(".png"))
        print(report.plot(out))
        return 0
    text = {"md": report.to_markdown, "html": report._repr_html_, "json": report.to_json}.get(fmt)
    if text is None:  # "text": the rich table (and the server scenario's tables, when it ran)
        report.print()
        if report.scenario:
            from .serving.scenario_render import print_scenario

            print_scenario(report.scenario)
        return 0
    if args.output:
        Path(args.output).write_text(text())
    else:
        print(text())
    return 0


def cmd_search(args) -> int:
    from .search.driver import search, search_timing

    result = search(args.model, candidates=args.candidates, max_accuracy_drop=args.max_accuracy_drop,
                    objective=args.objective, budget=args.budget, store=args.store, sampler=args.sampler,
                    max_length=args.max_length, workers=args.workers, address=args.address, seed=args.seed,
                    timing=_timing(True) if args.quick else search_timing())
    result.print()
    if args.markdown:
        Path(args.markdown).write_text(result.to_markdown())
    if args.plot:
        print(f"plot: {result.plot(args.plot)}", file=sys.stderr)
    if result.best_pipeline is not None:
        print(f"best pipeline: {result.best_pipeline}")
        print(f"reproduce: optistack run --model {args.model} --pipeline '{result.best_pipeline}' "
              f"--max-accuracy-drop {args.max_accuracy_drop:g}", file=sys.stderr)
    return 0


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="workload name (see `optistack workloads`)")
    p.add_argument("--candidates", action="append", required=True,
                   help='passes to combine, e.g. "int8-dynamic,compile,ort-quantize{per_channel=true|false}" '
                        "(repeatable; a|b or * in an option lists choices)")
    p.add_argument("--max-accuracy-drop", type=float, default=DEMO_BUDGET, help="accuracy budget (0.01 = 1%%)")
    p.add_argument("--objective", choices=("latency", "throughput", "size", "ttft"), default="latency")
    p.add_argument("--budget", default="20", help='trials (e.g. 20) or wall time ("90s", "10m", "1h")')
    p.add_argument("--store", default="optistack-search.db", help="SQLite file of trials; rerun to resume")
    p.add_argument("--sampler", choices=("tpe", "grid", "random", "greedy"), default="tpe")
    p.add_argument("--max-length", type=int, default=3, help="most passes in one pipeline")
    p.add_argument("--workers", type=int, default=1, help="trials in parallel on Ray (> 1 starts a local Ray)")
    p.add_argument("--address", default=None, help="an existing Ray cluster, e.g. auto or ray://host:10001")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="write the result (summary + Pareto table) as markdown here")
    p.add_argument("--plot", help="write the Pareto PNG here")
    p.add_argument("--quick", action="store_true", help="fewer timing rounds per trial (wider CIs)")


def cmd_serve(args) -> int:
    from .serving.launch import serve_from_args

    return serve_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from .serving.scenario_cli import add_scenario_args

    parser = argparse.ArgumentParser(prog="optistack", description="Optimize PyTorch models, measured after every pass.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_run_args(p, pipeline_required: bool) -> None:
        p.add_argument("--model", default="minilm",
                       help="workload name (see `optistack workloads`), Hugging Face model folder, .gguf file, "
                            "or module:factory")
        p.add_argument("--data", help="your data: .txt/.jsonl/.csv/.parquet file or datasets folder, split into "
                                      "disjoint evaluation and calibration parts")
        p.add_argument("--task", choices=("causal-lm", "encoder", "sequence-classification", "image-classification"),
                       help="the model's task when config.json's architectures do not tell")
        p.add_argument("--save", help="write the final model here (--save-format)")
        p.add_argument("--save-format", choices=("auto", "hf", "optistack", "gguf"), default="auto",
                       help="hf: a Hugging Face folder (compressed-tensors for int4/int8/fp8) that transformers and "
                            "vLLM load; optistack: optistack's own folder, any pipeline (optistack serve and "
                            "optistack.load_model read it); auto (default): hf where that format holds the model, "
                            "else optistack's own; gguf: one .gguf file llama.cpp runs (Llama, Qwen2, Qwen3, SmolLM3; int4 -> "
                            "Q4_0/Q4_1, int8 -> Q8_0), see docs/gguf.md")
        p.add_argument("--pipeline", required=pipeline_required, default=None,
                       help='e.g. "int8-dynamic,compile" or a preset, "@llm-decode" (see `optistack presets`)')
        p.add_argument("--max-accuracy-drop", type=float, default=DEMO_BUDGET if not pipeline_required else None,
                       help="reject passes whose accuracy drop from the original exceeds this (0.01 = 1%%)")
        p.add_argument("--json", help="write the report JSON here")
        p.add_argument("--markdown", help="write the report as markdown here")
        p.add_argument("--plot", help="write a speedup/accuracy PNG here")
        p.add_argument("--quick", action="store_true", help="fewer timing rounds (wider CIs)")
        add_scenario_args(p)
        p.add_argument("--verbose", "-v", action="store_true",
                       help="after the report, print the full traceback of every failed step")

    add_run_args(sub.add_parser("run", help="run a pipeline on a workload and print the report"), True)
    p = sub.add_parser("demo", help="the tour: presets, MiniLM @encoder-latency, SmolLM2 answering through generate() "
                                    "original vs optimized (or, with --pipeline, one pipeline's report)")
    add_run_args(p, False)
    from .demo import DEMO_LLM_PIPELINE, DEMO_PROMPT

    p.add_argument("--llm-pipeline", default=DEMO_LLM_PIPELINE,
                   help="the chain SmolLM2 gets in the tour (default: @llm-decode with round-to-nearest int4 "
                        "instead of AWQ's minutes of calibration)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="what SmolLM2 is asked in the tour")
    p.add_argument("--tokens", type=int, default=64, help="tokens SmolLM2 generates in the tour")
    p.add_argument("--skip-encoder", action="store_true", help="leave MiniLM out of the tour")
    p = sub.add_parser("passes", help="list every pass, available or not, with the reason")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("presets", help="list the named pipelines (@name) and what they expand to here")
    p.add_argument("--json", action="store_true")
    sub.add_parser("workloads", help="list workload names")
    p = sub.add_parser("report", help="re-render a saved report")
    p.add_argument("path")
    p.add_argument("--format", choices=("text", "md", "html", "json", "png"), default="text")
    p.add_argument("--output", "-o", help="file to write (default: stdout; png: next to the JSON)")
    add_search_args(sub.add_parser("search", help="search pass combinations for the fastest within an accuracy budget"))
    from .serving.launch import add_serve_args

    add_serve_args(sub.add_parser("serve", help="serve a saved optimized model over an OpenAI-compatible HTTP API"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .core.errors import OptistackError

    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "demo": cmd_demo, "passes": cmd_passes, "presets": cmd_presets, "workloads": cmd_workloads,
               "report": cmd_report, "search": cmd_search, "serve": cmd_serve}[args.command]
    try:
        return handler(args)
    except (OptistackError, FileNotFoundError, ValueError) as exc:
        print(f"optistack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
