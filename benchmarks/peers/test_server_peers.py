"""The server scenario (MLPerf LoadGen: Offline, then Server runs with a max-QPS search) on three backends of
SmolLM2-135M-Instruct, one after the other in one process, on the same requests and the same LoadGen settings:

- stock: the original fp32 model on transformers' continuous batching (`StockBackend`);
- optimized: the model after `@llm-decode` (or `$OPTISTACK_PEER_PIPELINE`) on `serving.backends_for` (the C++
  engine's continuous batching where the decode engine was built);
- OpenVINO GenAI: the same model exported by optimum-intel to int4 weights (asymmetric, group 64; the embedding /
  `lm_head` in NNCF's int8 backup) on `ContinuousBatchingPipeline` (`openvino_genai_backend.py`), twice:
  `openvino` with `INFERENCE_PRECISION_HINT=f32`, which is what turns on OpenVINO's dynamic int8 quantization of
  activations (int4 weights x int8 activations, the arithmetic of optistack's engine; on the AMX Xeon here it
  decodes faster than the default), and `openvino-default` with the CPU's default properties (bf16 activations
  where the CPU has AMX, which skips the int8 path; its prompt chunks run faster). docs/peers.md has the numbers.

Every backend serves `max_batch` requests at once with a KV cache for `max_batch` x `max_context` tokens, chunks
prompts into the running batch, and runs on `OPTISTACK_PEER_THREADS` threads (2). The requests are built once
(`samples_from_workload`, seed fixed); requests never stop early (no stop tokens), so every backend generates the
same number of tokens. Prints one table (Offline tokens/s, max QPS within the p99 limits, p99 TTFT / TPOT and
goodput at that QPS) with optimized / stock and optimized / OpenVINO, and the scenario's two tables (summary and
every run); writes `.benchmarks/peers/server_scenario.json` (the full scenario, the load average sampled during
each backend's runs, the export's settings). Skipped with the reason where LoadGen, OpenVINO GenAI or the export
(optimum-intel's venv) is missing. Numbers are measured and printed, never asserted.

Environment (defaults finish in ~10-15 min on 2 cores):

| variable | default | meaning |
|---|---|---|
| `OPTISTACK_SERVER_SAMPLES` | 32 | requests built; the Offline run issues all of them |
| `OPTISTACK_SERVER_RUN_SAMPLES` | = samples | requests per Server run |
| `OPTISTACK_SERVER_STEPS` | 4 | Server runs in each backend's QPS search |
| `OPTISTACK_SERVER_RUN_SECONDS` | 30 | a Server run stops issuing after this |
| `OPTISTACK_SERVER_QPS_MIN` / `_MAX` | max / 8, Offline requests/s | the QPS search's bounds (each backend's own) |
| `OPTISTACK_SERVER_INPUT_TOKENS` / `_OUTPUT_TOKENS` | 32,256 / 16,64 | prompt and new-token lengths drawn (LO,HI) |
| `OPTISTACK_SERVER_TTFT_LIMIT` / `_TPOT_LIMIT` | 2.0 / 0.1 | p99 limits, seconds (MLPerf Llama-3.1-8B Server) |
| `OPTISTACK_SERVER_SEED` | 0 | requests and arrival schedule |
| `OPTISTACK_SERVER_MAX_BATCH` | 8 | requests served together by every backend |
| `OPTISTACK_SERVER_BACKENDS` | stock,optimized,openvino,openvino-default | which to run (in this order) |
| `OPTISTACK_OV_BATCHED_TOKENS` | 128 | OpenVINO GenAI's max_num_batched_tokens (= our engine's step_tokens) |
| `OPTISTACK_SERVER_LOGS` | — | keep LoadGen's logs here, one folder a run |
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from openvino_export import ExportUnavailable, export_int4
from openvino_genai_backend import DEFAULT_BATCHED_TOKENS, OpenVINOGenAIBackend, available
from peer_results import _loadavg

ROLES = ("stock", "optimized", "openvino", "openvino-default")
OV_PROPERTIES = {"openvino": {"INFERENCE_PRECISION_HINT": "f32"}, "openvino-default": {}}
CHECK_TOKENS = 32  # greedy tokens of the first request, compared with stock's (a sanity check of each model)


def _env(name: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a {kind.__name__}; got {raw!r}") from None
    if isinstance(value, (int, float)) and value < 0:
        raise pytest.UsageError(f"{name} must be >= 0; got {raw!r}")
    return value


def _env_range(name: str, default: tuple[int, int]) -> tuple[int, int]:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        lo, hi = (int(x) for x in raw.split(","))
    except ValueError:
        raise pytest.UsageError(f"{name} must be LO,HI (e.g. 32,256); got {raw!r}") from None
    return lo, hi


def scenario_options() -> Any:
    from optistack.serving.loadgen_scenario import ScenarioOptions

    samples = _env("OPTISTACK_SERVER_SAMPLES", int, 32)
    return ScenarioOptions(
        ttft_limit_s=_env("OPTISTACK_SERVER_TTFT_LIMIT", float, 2.0),
        tpot_limit_s=_env("OPTISTACK_SERVER_TPOT_LIMIT", float, 0.1),
        samples=samples, server_samples=_env("OPTISTACK_SERVER_RUN_SAMPLES", int, samples),
        max_run_s=_env("OPTISTACK_SERVER_RUN_SECONDS", float, 30.0), search_steps=_env("OPTISTACK_SERVER_STEPS", int, 4),
        qps_min=_env("OPTISTACK_SERVER_QPS_MIN", float, None), qps_max=_env("OPTISTACK_SERVER_QPS_MAX", float, None),
        seed=_env("OPTISTACK_SERVER_SEED", int, 0), max_batch=_env("OPTISTACK_SERVER_MAX_BATCH", int, 8),
        input_tokens=_env_range("OPTISTACK_SERVER_INPUT_TOKENS", (32, 256)),
        output_tokens=_env_range("OPTISTACK_SERVER_OUTPUT_TOKENS", (16, 64)),
        log_dir=os.environ.get("OPTISTACK_SERVER_LOGS") or None)


def cpu_facts() -> dict[str, Any]:
    """The CPU's model and whether it has AMX (OpenVINO and oneDNN pick their int8/bf16 kernels by it)."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": model, "amx": sorted(f for f in flags if f.startswith("amx")),
            "avx512_vnni": "avx512_vnni" in flags, "cpus": os.cpu_count()}


class LoadSampler:
    """/proc/loadavg every `every_s` while a backend runs: a shared machine shows here, beside its numbers."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.samples = every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="optistack-loadavg")

    def _run(self) -> None:
        started = time.perf_counter()
        while True:
            self.samples.append([round(time.perf_counter() - started, 1), *(_loadavg() or [])])
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(["end", *(_loadavg() or [])])

    def summary(self) -> dict[str, Any]:
        one = [s[1] for s in self.samples if len(s) > 1]
        return {"samples": self.samples, "1min_min": min(one, default=None), "1min_max": max(one, default=None)}


def greedy_tokens(backend: Any, prompt: tuple[int, ...]) -> list[int]:
    from optistack.serving.backend import SamplingParams

    handle = backend.submit(list(prompt), SamplingParams(max_new_tokens=CHECK_TOKENS))
    handle.wait(300)
    return list(handle.tokens)


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _best(b: Any) -> Any:
    return b.best_run


def _row_values(b: Any) -> dict[str, Any]:
    best = _best(b)
    lg = best.loadgen if best else {}
    return {"offline_tokens_per_s": b.offline.loadgen.get("tokens_per_s", b.offline.tokens_per_s),
            "max_qps": b.max_qps,
            "p99_ttft_ms": 1e3 * lg.get("ttft_p99", best.ttft_s.p99) if best else None,
            "p99_tpot_ms": 1e3 * lg.get("tpot_p99", best.tpot_s.p99) if best else None,
            "goodput_rps": best.goodput_rps if best else None}


def _status(b: Any) -> str:
    if b.max_qps is None:
        return f"ok; no QPS met the limits (lowest probed {b.qps_range[0]:.3g})"
    if b.max_qps >= b.qps_range[1]:
        return f"ok; max QPS = its range top {b.qps_range[1]:.3g} (a lower bound)"
    return f"ok; first failing QPS {b.first_failing_qps:.3g}" if b.first_failing_qps else "ok"


def _ratio_cells(label: str, ratios: dict[str, Any]) -> dict[str, Any]:
    kind, qps = ratios.get("max_qps_ratio_is"), ratios.get("max_qps")
    if qps is None:
        qps_cell = "— (no QPS met the limits on one side)"
    elif kind is None:  # both at the top of their ranges: two lower bounds do not make a ratio
        qps_cell = f"— (both at their range top; the tops' ratio is {qps:.2f})"
    else:
        qps_cell = {"exact": "", "at_least": ">= ", "at_most": "<= "}[kind] + f"{qps:.2f}"
    return {f"{label}: Offline tokens/s": ratios.get("offline_tokens_per_s"),
            f"{label}: max QPS within limits": qps_cell,
            f"{label}: goodput at each one's max QPS": ratios.get("goodput_rps_at_max_qps")}


@pytest.mark.slow
def test_server_scenario_peers(results_table, peer_settings):
    if importlib.util.find_spec("mlperf_loadgen") is None:
        pytest.skip("the server scenario needs MLPerf LoadGen: pip install 'optistack[loadgen]'")
    roles = [r.strip() for r in os.environ.get("OPTISTACK_SERVER_BACKENDS", ",".join(ROLES)).split(",") if r.strip()]
    if not set(roles) <= set(ROLES):
        raise pytest.UsageError(f"OPTISTACK_SERVER_BACKENDS takes {','.join(ROLES)}; got {roles}")
    ok, why = available()
    wants_ov = any(r.startswith("openvino") for r in roles)
    if wants_ov and not ok:
        pytest.skip(why)

    import torch

    from optistack.bundled_models import cache_root, smollm2_dir
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.serving import backends_for
    from optistack.serving.loadgen_scenario import ScenarioResult, run_scenario
    from optistack.serving.samples import samples_from_workload
    from optistack.serving.scenario_render import render_text
    from optistack.serving.stock import StockBackend
    from optistack.workloads import load

    threads = peer_settings["threads"]
    torch.set_num_threads(threads)
    options = scenario_options()
    batched = _env("OPTISTACK_OV_BATCHED_TOKENS", int, DEFAULT_BATCHED_TOKENS)

    # the export first: without it there is no comparison, and nothing has been measured yet
    export_dir, export = None, {}
    if wants_ov:
        try:
            export_dir, export = export_int4(smollm2_dir(), cache_root())
        except ExportUnavailable as exc:
            pytest.skip(str(exc))

    wl = load("smollm2")
    samples = samples_from_workload(wl, options.samples, seed=options.seed, input_tokens=options.input_tokens,
                                    output_tokens=options.output_tokens)
    limit = wl.model.config.max_position_embeddings
    context = min(-(-max(s.context for s in samples) // 64) * 64, limit)  # the longest request, rounded up to 64
    text = os.environ.get("OPTISTACK_PEER_PIPELINE", "@llm-decode")
    pipeline = Pipeline.parse(text)
    optimized = None
    if "optimized" in roles:  # built before anything is timed: build time is not run time
        started = time.perf_counter()
        optimized = pipeline.apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
        built_s = time.perf_counter() - started

    settings = {"model": "SmolLM2-135M-Instruct", "threads": threads, "max_batch": options.max_batch,
                "max_context": context, "samples": options.samples, "server_samples": options.server_samples,
                "search_steps": options.search_steps, "max_run_s": options.max_run_s,
                "input_tokens": list(options.input_tokens), "output_tokens": list(options.output_tokens),
                "limits": f"p99 TTFT <= {options.ttft_limit_s} s, p99 TPOT <= {1e3 * options.tpot_limit_s:g} ms",
                "seed": options.seed, "optistack_pipeline": str(pipeline), "openvino_max_num_batched_tokens": batched}
    table = results_table("server_scenario", settings, columns=("offline_tokens_per_s", "max_qps", "p99_ttft_ms",
                                                                "p99_tpot_ms", "goodput_rps"))
    info = {"source": wl.name, "count": len(samples), "seed": options.seed,
            "prompt_tokens": [min(len(s.prompt_ids) for s in samples), max(len(s.prompt_ids) for s in samples)],
            "new_tokens": [min(s.max_new_tokens for s in samples), max(s.max_new_tokens for s in samples)],
            "stop_at_eos": False, "decoding": "greedy", "max_context": context}
    makers = {
        "stock": ("fp32, transformers continuous batching", lambda: StockBackend(
            wl.model, wl.tokenizer, max_batch=options.max_batch, max_context=context,
            name="transformers continuous batching (original fp32)")),
        "optimized": (f"{text} = {pipeline}", lambda: backends_for(
            optimized, wl.tokenizer, max_batch=options.max_batch, max_context=context)),
    }
    for role, props in OV_PROPERTIES.items():
        shown = ", ".join(f"{k}={v}" for k, v in props.items()) or "the CPU's default properties"
        makers[role] = (f"int4 asym g64 (optimum-intel), ContinuousBatchingPipeline, {shown}",
                        lambda props=props, shown=shown: OpenVINOGenAIBackend(
                            export_dir, max_batch=options.max_batch, max_context=context, threads=threads,
                            max_num_batched_tokens=batched, properties=props, export=export,
                            name=f"OpenVINO GenAI continuous batching ({shown})"))
    results, loads, checks, failures = {}, {}, {}, []
    for role in roles:
        setting, make = makers[role]
        gc.collect()
        try:
            backend = make()
        except Exception as exc:  # noqa: BLE001 - a backend that cannot be made is a row, the others still run
            table.add(role, setting, status=f"not run: {type(exc).__name__}: {exc}")
            failures.append(role)
            continue
        print(f"\n[{time.strftime('%H:%M:%S')}] server scenario: {role} on {backend.name} "
              f"(load average {_loadavg()})", flush=True)
        try:
            with LoadSampler() as sampler:
                results[role] = run_scenario(backend, samples, options, role=role)
            checks[role] = greedy_tokens(backend, samples[0].prompt_ids)
        except Exception as exc:  # noqa: BLE001 - recorded, and the test fails at the end
            table.add(role, setting, status=f"failed: {type(exc).__name__}: {exc}")
            failures.append(role)
            continue
        finally:
            backend.close()
        loads[role] = sampler.summary()
        table.add(role, setting, **_row_values(results[role]), status=_status(results[role]))

    order = ("stock", "openvino-default", "openvino", "optimized")  # the scenario's own ratio: last over first
    ordered = tuple(results[r] for r in order if r in results)
    scenario = ScenarioResult(options, info, ordered)
    if "optimized" in results:
        for other, label in (("stock", "optimized / stock"), ("openvino", "optimized / OpenVINO GenAI (f32 hint)"),
                             ("openvino-default", "optimized / OpenVINO GenAI (CPU defaults)")):
            if other in results:
                pair = ScenarioResult(options, info, (results[other], results["optimized"])).ratios()
                table.ratios.update(_ratio_cells(label, pair))
    if "stock" in checks:
        for role in ("optimized", "openvino", "openvino-default"):
            if role in checks:
                table.ratios[f"greedy tokens of request 0 shared with stock (fp32) before the first difference: {role}"] = \
                    f"{shared_prefix(checks['stock'], checks[role])} of {CHECK_TOKENS}"
    if optimized is not None:
        table.notes.append(f"optimized: pipeline applied in {built_s:.0f} s before anything was timed")
    if export:
        table.notes.append(f"OpenVINO IR: {export_dir} ({export.get('compression')}), exported in "
                           f"{export.get('seconds')} s by {export['stamp']['versions'].get('optimum-intel', '?')} optimum-intel")
    table.notes.append("load average (1 min) during each backend's runs: " + ", ".join(
        f"{r} {v['1min_min']}-{v['1min_max']}" for r, v in loads.items()))
    table.notes.append("p99 TTFT / TPOT and goodput are LoadGen's, at each backend's own max QPS (capacities compare; "
                       "latencies at two loads do not)")
    d = scenario.to_dict()
    table.details = {"scenario": d, "run_order": [r for r in roles if r in results], "load_average_during": loads,
                     "cpu": cpu_facts(), "greedy_check_tokens": checks, "export": export}
    if ordered:
        print("\n" + render_text(d), flush=True)
    assert not failures, f"backends that did not run: {failures} (see the table)"
    for role, b in results.items():
        assert b.offline.answered == b.offline.issued, f"{role}: Offline answered {b.offline.answered} of {b.offline.issued}"
