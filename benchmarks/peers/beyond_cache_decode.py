"""Decode beyond the cache, side by side from one file: optistack's engine and llama.cpp on the same weights.

    python benchmarks/peers/beyond_cache_decode.py [--model llama-1.1b | qwen-1.5b-shape | qwen3-0.6b-shape]
        [--rounds 4] [--tokens 64] [--threads 2]

A Llama of the named shape (benchmarks/engine_bytes.py; SmolLM2's 49,152-token vocabulary, so the bundled
GGUF's tokenizer fits; `qwen3-0.6b-shape` is a Qwen3 with Qwen3-0.6B's body: hidden 1024, 28 layers, 16 query
heads of 128 over 8 key/value heads, q/k norms, written as llama.cpp's "qwen3" graph) gets seeded random
weights and `rtn-int4{zero_point=false,group_size=64,head=int8}`: a symmetric int4 grid, which `save_gguf`
writes as Q4_0 (llama.cpp's fastest 4-bit format; the int8 head as Q8_0) with no re-rounding. llama.cpp
decodes that file (llama_cpp_runner.py, its own process, `n_batch=1`); optistack decodes the same quantized
model after `fuse-kernels,decode-engine`. Rounds interleave the two; each prints its tokens/s (median step
after a 16-token prompt) and the ratio's median and range. Needs llama-cpp-python.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
QWEN3 = {"qwen3-0.6b-shape": (1024, 3072, 28, 16, 8, 128)}  # hidden, intermediate, layers, heads, kv, head size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1.1b", choices=["llama-1.1b", "qwen-1.5b-shape", *QWEN3])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE.parent))
    import torch
    from engine_bytes import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM

    from optistack.bundled_models import smollm2_gguf
    from optistack.checkpoints import save_gguf
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model in QWEN3:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        hidden, inter, layers, heads, kv, head_dim = QWEN3[args.model]
        model = Qwen3ForCausalLM(Qwen3Config(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=head_dim, vocab_size=49152, max_position_embeddings=2048,
            tie_word_embeddings=False)).eval()
    else:
        hidden, inter, layers, heads, kv, _ = SHAPES[args.model]
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)).eval()
    model = Pipeline.parse("rtn-int4{zero_point=false,group_size=64,head=int8}").apply(model, PassContext()).model
    tmp = Path(tempfile.mkdtemp(prefix="beyond-cache-"))
    written = save_gguf(tmp / "model.gguf", model, tokenizer=str(smollm2_gguf()))
    model = Pipeline.parse("fuse-kernels,decode-engine{check_prompts=0}").apply(model, PassContext()).model
    prompt = (torch.arange(16) * 37 + 100).unsqueeze(0)
    (tmp / "prompt.json").write_text(json.dumps(prompt[0].tolist()))
    print(f"model {args.model}: {written.path.stat().st_size / 1e6:.0f} MB GGUF ({written.file_type}), "
          f"{args.threads} threads, {args.tokens} decode steps after a 16-token prompt")
    ours_rates, theirs_rates = [], []
    for r in range(args.rounds):
        greedy_decode(model, prompt, 4)  # warm
        steps = greedy_decode(model, prompt, args.tokens).step_ms[1:]
        ours_rates.append(1000.0 / statistics.median(steps))
        proc = subprocess.run([sys.executable, str(HERE / "llama_cpp_runner.py"), "--model", str(written.path),
                               "--prompt-ids", str(tmp / "prompt.json"), "--new-tokens", str(args.tokens),
                               "--threads", str(args.threads), "--n-batch", "1", "--repeats", "1"],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"  round {r + 1}: llama.cpp failed: {proc.stderr.strip().splitlines()[-1:]}")
            return 1
        theirs_rates.append(json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"][0])
        print(f"  round {r + 1}: optistack {ours_rates[-1]:.1f} tok/s, llama.cpp {theirs_rates[-1]:.1f} tok/s, "
              f"ratio {ours_rates[-1] / theirs_rates[-1]:.3f}", flush=True)
    ratios = sorted(o / t for o, t in zip(ours_rates, theirs_rates))
    print(f"  medians: optistack {statistics.median(ours_rates):.1f}, llama.cpp {statistics.median(theirs_rates):.1f} "
          f"tok/s; ratio median {statistics.median(ratios):.3f} (rounds {ratios[0]:.3f}..{ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
