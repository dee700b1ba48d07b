"""Peak resident memory of a whole pipeline run against the model's fp32 size (issue 25: bounded memory).

    python benchmarks/pipeline_memory.py [--model llama-1.1b | llama-360m] [--pipeline rtn-int4,fuse-kernels]
        [--instruments gate | default] [--src PATH]

Each run is a fresh subprocess: it builds a Llama-architecture model of the named shape with seeded random
weights (nothing is downloaded), wraps it in a GenericWorkload over random token ids (also the calibration
set), runs the pipeline through `Pipeline.run` and prints the process's resident high-water mark (VmHWM,
which includes Python, torch and the workload) against the model's fp32 bytes, with the RSS after the build.
`--instruments gate`: only the gate (a finite-output check per step); `default`: the benchmark instrument
too, with a short timing config (its noise floor's reference copy included). `--src` points the child at
another checkout's `src/` (`git worktree add /tmp/base <commit>` to measure older code).
The bar: peak <= 1.5x fp32 for `rtn-int4,fuse-kernels` on llama-1.1b.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-1.1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama's shape
    "llama-360m": (960, 2560, 32, 15, 5, 49152),  # SmolLM2-360M's shape
}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optistack.core.pipeline import Pipeline
    from optistack.workloads.generic import GenericWorkload

    torch.set_num_threads(2)
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.model]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = [{"input_ids": torch.randint(0, vocab, (1, 32), generator=g), "use_cache": False} for _ in range(4)]
    wl = GenericWorkload(model, ids[0], eval_inputs=ids[1:])
    built = _status_kb("VmRSS") * 1024
    if args.instruments == "gate":
        instruments = []
        timing = None
    else:
        from optistack.bench.benchmark import BenchmarkInstrument
        from optistack.bench.timer import TimingConfig

        timing = TimingConfig(warmup=1, min_rounds=3, max_rounds=3, max_seconds=5.0)
        instruments = [BenchmarkInstrument(timing=timing)]
    result = Pipeline.parse(args.pipeline).run(wl, instruments=instruments, verbose=False)
    steps = [{"pass": s.text, "status": s.status, "reason": (s.reason or "")[:160],
              "peak_rss_bytes": getattr(s, "peak_rss_bytes", None)} for s in result.report.steps]
    print(json.dumps({"fp32_bytes": fp32, "rss_after_build": built, "peak_rss": _status_kb("VmHWM") * 1024,
                      "steps": steps}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--pipeline", default="rtn-int4,fuse-kernels")
    ap.add_argument("--instruments", default="gate", choices=["gate", "default"])
    ap.add_argument("--src", default=None, help="run another checkout's src/ (e.g. /tmp/base/src)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = os.path.abspath(args.src or os.path.join(os.path.dirname(__file__), "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--pipeline", args.pipeline,
           "--instruments", args.instruments]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
        return out.returncode
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    print(f"code: {src}\nmodel {args.model}: fp32 {r['fp32_bytes'] / gib:.2f} GiB; pipeline {args.pipeline}; "
          f"instruments {args.instruments}")
    for s in r["steps"]:
        rss = f", peak RSS so far {s['peak_rss_bytes'] / gib:.2f} GiB" if s["peak_rss_bytes"] else ""
        print(f"  {s['pass']}: {s['status']}{rss} {s['reason']}")
    print(f"RSS after build {r['rss_after_build'] / gib:.2f} GiB ({r['rss_after_build'] / r['fp32_bytes']:.2f}x fp32); "
          f"peak RSS {r['peak_rss'] / gib:.2f} GiB = {r['peak_rss'] / r['fp32_bytes']:.2f}x fp32 (bar: <= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
