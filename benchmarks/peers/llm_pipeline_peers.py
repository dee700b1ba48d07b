"""TTFT and plain decode tokens/s: optistack against OpenVINO GenAI's `LLMPipeline` (int4), one process, interleaved.

    python benchmarks/peers/llm_pipeline_peers.py [--model smollm2 | llama-1.1b] [--chain TEXT] [--rounds 5]
        [--repeats 5] [--threads 2] [--configs ov-f32,ov-default] [--json PATH]

Both sides get the same prompt token ids (the smollm2 workload's 128-token generation prompt: the start of its
evaluation text, fixed), `--threads` threads (`torch.set_num_threads`; `INFERENCE_NUM_THREADS`), greedy, EOS ignored.
TTFT is the wall time of the one call that returns the first token: ours `model.generate(ids, attention_mask,
max_new_tokens=1, do_sample=False)` after `--chain`, OpenVINO's `LLMPipeline.generate(ov.Tensor(ids), config)`
(its own `perf_metrics.get_ttft()` recorded beside); median of `--repeats` calls a round after a warm-up call.
Every TTFT call gets a prompt no side has seen (the prompt rotated by a different count; both sides get the same
ones): LLMPipeline on CPU keeps the blocks of earlier prompts and reuses a matching prefix (prefix caching is on
by default), so the same prompt again took 9-17 ms where a new one took 66-76 ms (SmolLM2, 2 threads, Zen 4,
2026-12-06); an earlier version of this script repeated one prompt and timed that cache hit.
Decode is `--new-tokens` tokens after the same prompt, each stamped by a streamer given token ids (ours a
transformers streamer, OpenVINO's a `StreamerBase`): (n - 1) / (t_last - t_first). OpenVINO runs as `ov-f32`
(`INFERENCE_PRECISION_HINT=f32`: dynamic int8 activations x int4 weights) and `ov-default` (the CPU's defaults:
bf16 on AMX), as in test_server_peers.py. Rounds interleave the sides, the order reversed every other round.
Printed: every round, the medians, and per-round ratios (median, min-max) as optistack's speedup (>1: optistack
faster; TTFT OV/ours, decode ours/OV).

`llama-1.1b` is engine_bytes.py's TinyLlama shape with SmolLM2's 49,152-token vocabulary and tokenizer and seeded
random weights, saved once as a HF folder in the optistack cache (with a marker); optimum-intel exports it like
SmolLM2 (openvino_export.py: int4 asym g64), and our side loads the same folder (fp32) before `--chain`.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_CHAIN = "rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine"  # @llm-decode with RTN for AWQ
OV_CONFIGS = {"ov-f32": {"INFERENCE_PRECISION_HINT": "f32"}, "ov-default": {}}
PAD = 2  # SmolLM2's EOS / pad id, in both models


class TokenTimes:
    """A transformers streamer (`put`/`end`; the prompt's put skipped) that stamps every generated token."""

    def __init__(self, skip_first_put: bool) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._skip = skip_first_put  # transformers' first put is the prompt

    def put(self, value: Any) -> None:
        if not self._skip:
            self.stamp(value.reshape(-1).tolist())
        self._skip = False

    def stamp(self, ids: list[int]) -> None:
        now = time.perf_counter()
        self.times += [now] * len(ids)
        self.tokens += [int(t) for t in ids]

    def end(self) -> None:
        pass

    def rate(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else float("nan")


def timed_calls(call: Any, repeats: int) -> tuple[list[float], list[Any]]:
    """(wall ms of each call, its results): `repeats` calls after one warm-up call; call(k), k = 0 the warm-up."""
    call(0)
    walls, results = [], []
    for k in range(1, repeats + 1):
        start = time.perf_counter()
        results.append(call(k))
        walls.append((time.perf_counter() - start) * 1e3)
    return walls, results


class FreshPrompts:
    """The prompt rotated by a count never used before, for each TTFT call: the same sequence for every side (each
    side takes the n-th prompt of the round at its n-th call), so no side ever sees a prompt, or a prefix of one,
    twice (a cached prefix is not a time to first token)."""

    def __init__(self, ids: Any) -> None:
        self.ids, self.round = ids, 0

    def get(self, repeats: int, k: int) -> Any:
        import torch

        shift = 1 + (self.round * (repeats + 1) + k) % (self.ids.shape[1] - 1)
        return torch.roll(self.ids, shifts=shift, dims=1)


class Ours:
    """optistack's side: the model after the chain, called through `model.generate`."""

    def __init__(self, model: Any, ids: Any) -> None:
        import torch
        from transformers import GenerationConfig

        self.model, self.ids, self.mask = model, ids, torch.ones_like(ids)
        self.base = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=PAD, bos_token_id=None)
        model.generation_config.eos_token_id = None  # else generate() fills it in; OpenVINO runs with ignore_eos

    def _generate(self, n: int, streamer: Any = None, ids: Any = None) -> Any:
        import torch

        config = copy.deepcopy(self.base)
        config.max_new_tokens = n
        ids = self.ids if ids is None else ids
        with torch.inference_mode():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                       streamer=streamer)

    def ttft(self, repeats: int, prompts: FreshPrompts) -> dict[str, Any]:
        walls, _ = timed_calls(lambda k: self._generate(1, ids=prompts.get(repeats, k)), repeats)
        return {"wall_ms": walls, "path": dict(getattr(self.model.generate, "last", {}))}

    def decode(self, n: int) -> dict[str, Any]:
        times = TokenTimes(skip_first_put=True)
        self._generate(n, times)
        return {"tokens_per_s": times.rate(), "tokens": times.tokens}


class OpenVINOSide:
    """OpenVINO GenAI's side: one `LLMPipeline` with the given CPU properties."""

    def __init__(self, ir: Path, ids: Any, threads: int, properties: dict[str, Any]) -> None:
        import numpy as np
        import openvino as ov
        import openvino_genai as genai

        self.genai, self.properties = genai, {"INFERENCE_NUM_THREADS": threads, **properties}
        started = time.perf_counter()
        self.pipe = genai.LLMPipeline(str(ir), "CPU", **self.properties)
        self.load_s = time.perf_counter() - started
        self.ids, running = ov.Tensor(np.asarray(ids.numpy(), dtype=np.int64)), genai.StreamingStatus.RUNNING

        class Streamer(genai.StreamerBase):  # token ids, not text: one stamp per token
            def __init__(self) -> None:
                super().__init__()
                self.times = TokenTimes(skip_first_put=False)

            def write(self, token: Any) -> Any:
                self.times.stamp(token if isinstance(token, list) else [token])
                return running

            def end(self) -> None:
                pass

        self._streamer = Streamer

    def _config(self, n: int) -> Any:
        config = self.genai.GenerationConfig()
        config.max_new_tokens, config.ignore_eos, config.do_sample = n, True, False
        return config

    def ttft(self, repeats: int, prompts: FreshPrompts) -> dict[str, Any]:
        import numpy as np
        import openvino as ov

        config = self._config(1)
        walls, results = timed_calls(
            lambda k: self.pipe.generate(ov.Tensor(np.asarray(prompts.get(repeats, k).numpy(), dtype=np.int64)), config),
            repeats)
        return {"wall_ms": walls, "perf_metrics_ttft_ms": [float(r.perf_metrics.get_ttft().mean) for r in results]}

    def decode(self, n: int) -> dict[str, Any]:
        streamer = self._streamer()
        pm = self.pipe.generate(self.ids, self._config(n), streamer).perf_metrics
        return {"tokens_per_s": streamer.times.rate(), "tokens": streamer.times.tokens,
                "perf_metrics_tokens_per_s": float(pm.get_throughput().mean),
                "perf_metrics_tpot_ms": float(pm.get_tpot().mean)}


def build_ours(args: argparse.Namespace, wl: Any) -> tuple[Any, Path, dict[str, Any]]:
    """(the model after the chain, the IR folder, the export's marker and the chain); the IR is exported first."""
    import torch
    from engine_bytes import SHAPES
    from openvino_export import export_int4, random_llama_dir
    from transformers import AutoModelForCausalLM

    from optistack.bundled_models import cache_root, smollm2_dir
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    pipeline = Pipeline.parse(args.chain)
    source = smollm2_dir() if args.model == "smollm2" else random_llama_dir(args.model, SHAPES[args.model][:5], cache_root())
    name = "smollm2-135m-instruct-int4-asym-g64" if args.model == "smollm2" else f"{source.name[:-3]}-int4-asym-g64"
    ir, marker = export_int4(source, cache_root(), name=name)  # before our model exists: one big model at a time
    if args.model == "smollm2":
        model = copy.deepcopy(wl.model)
    else:
        wl.model = None  # only the workload's prompt and calibration text are used
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    started = time.perf_counter()
    model = pipeline.apply(model, PassContext(workload=wl)).model
    return model, ir, {**marker, "ir": str(ir), "chain": str(pipeline), "chain_text": args.chain,
                       "chain_applied_s": round(time.perf_counter() - started, 1)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1.1b"])
    ap.add_argument("--chain", default=DEFAULT_CHAIN, help=f"optistack's chain (default {DEFAULT_CHAIN}; "
                    "'@llm-decode' runs the preset, AWQ calibration included)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="TTFT calls per round per side (median taken)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(OV_CONFIGS), help=f"OpenVINO configurations, of {list(OV_CONFIGS)}")
    ap.add_argument("--json", type=Path, help="write every round, the summary, the machine and versions here")
    args = ap.parse_args()
    for label in ("rounds", "repeats", "prompt_tokens", "threads"):
        if getattr(args, label) < 1:
            ap.error(f"--{label.replace('_', '-')} must be >= 1, got {getattr(args, label)}")
    if args.new_tokens < 2:
        ap.error(f"--new-tokens must be >= 2 (a decode rate needs two stamped tokens), got {args.new_tokens}")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs or any(c not in OV_CONFIGS for c in args.configs):
        ap.error(f"--configs {','.join(args.configs)!r}: give a comma-separated subset of {list(OV_CONFIGS)}")
    return args


def run_rounds(sides: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every side's TTFT, then every side's decode, per round; the order reversed on every other round."""
    rounds, prompts = [], FreshPrompts(sides["optistack"].ids)
    for r in range(args.rounds):
        prompts.round = r
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        row: dict[str, Any] = {name: {"ttft": sides[name].ttft(args.repeats, prompts)} for name in order}
        for name in order:
            row[name]["decode"] = {k: v for k, v in sides[name].decode(args.new_tokens).items() if k != "tokens"}
        parts = []
        for name in sides:
            x = row[name]
            x["ttft_ms"], x["tokens_per_s"] = statistics.median(x["ttft"]["wall_ms"]), x["decode"]["tokens_per_s"]
            own = x["ttft"].get("perf_metrics_ttft_ms")
            parts.append(f"{name} TTFT {x['ttft_ms']:.1f} ms" + (f" (own {statistics.median(own):.1f})" if own else "")
                         + f", decode {x['tokens_per_s']:.1f} tok/s")
        print(f"  round {r + 1} ({', '.join(order)}): " + "; ".join(parts), flush=True)
        rounds.append(row)
    return rounds


def summarize(rounds: list[dict[str, Any]], sides: dict[str, Any]) -> dict[str, Any]:
    """Medians per side and per-round ratios, both as optistack's speedup (>1: optistack faster)."""
    def spread(v: list[float]) -> str:
        return f"median {statistics.median(v):.3f}x, rounds {min(v):.3f}-{max(v):.3f}x"

    summary: dict[str, Any] = {}
    for name in sides:
        summary[name] = {"ttft_ms_median": statistics.median(x[name]["ttft_ms"] for x in rounds),
                         "tokens_per_s_median": statistics.median(x[name]["tokens_per_s"] for x in rounds)}
        print(f"  {name}: TTFT median {summary[name]['ttft_ms_median']:.1f} ms, decode median "
              f"{summary[name]['tokens_per_s_median']:.1f} tok/s")
    for c in (n for n in sides if n != "optistack"):
        ttft = [x[c]["ttft_ms"] / x["optistack"]["ttft_ms"] for x in rounds]
        dec = [x["optistack"]["tokens_per_s"] / x[c]["tokens_per_s"] for x in rounds]
        summary[f"vs {c}"] = {"ttft_ov_over_ours": ttft, "decode_ours_over_ov": dec}
        print(f"  vs {c}: TTFT {c}/optistack {spread(ttft)}; decode optistack/{c} {spread(dec)} "
              "(both: >1 means optistack is faster)")
    return summary


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import torch
    from openvino_genai_backend import available

    if not (ok := available())[0]:
        print(f"skipped: {ok[1]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import openvino
    import openvino_genai

    from optistack.bench.environment import machine_info, package_versions
    from optistack.presets import machine_features
    from optistack.workloads.smollm2 import SmolLM2Workload

    ids = (wl := SmolLM2Workload(prompt_tokens=args.prompt_tokens, gen_tokens=args.new_tokens))._gen_prompt
    model, ir, export = build_ours(args, wl)
    sides: dict[str, Any] = {"optistack": Ours(model, ids)}
    sides.update({c: OpenVINOSide(ir, ids, args.threads, OV_CONFIGS[c]) for c in args.configs})
    first = {name: side.decode(args.new_tokens) for name, side in sides.items()}  # warm-up; the greedy check
    if short := {n: len(r["tokens"]) for n, r in first.items() if len(r["tokens"]) != args.new_tokens}:
        raise RuntimeError(f"tokens generated {short}, not the {args.new_tokens} asked: a side stopped early")
    print(f"model {args.model}; optistack chain {export['chain']} (applied in {export['chain_applied_s']} s); "
          f"IR {ir.name} {export.get('compression', {})}; {args.threads} threads; prompt {ids.shape[1]} tokens, "
          f"{args.new_tokens} new; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for name in args.configs:
        print(f"  greedy tokens shared, optistack vs {name}: "
              f"{shared_prefix(first['optistack']['tokens'], first[name]['tokens'])} of {args.new_tokens}")
    summary = summarize(rounds := run_rounds(sides, args), sides)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak resident memory of this process (every side): {peak:.2f} GiB")
    if args.json:
        out = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                            "prompt_ids": ids[0].tolist()},
               "export": export, "greedy_first_run": first, "rounds": rounds, "summary": summary,
               "openvino": {n: {"properties": s.properties, "load_s": round(s.load_s, 2)}
                            for n, s in sides.items() if n != "optistack"},
               "machine": {**machine_info(), "features": sorted(machine_features()), "load_average": os.getloadavg()},
               "versions": {**package_versions(), "openvino (runtime)": openvino.get_version(),
                            "openvino_genai (runtime)": openvino_genai.get_version()},
               "peak_rss_gib": round(peak, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"  written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
