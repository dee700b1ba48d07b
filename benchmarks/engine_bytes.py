"""Bytes per token and decode speed of the engine's weight layouts, side by side in one process.

    python benchmarks/engine_bytes.py [--model smollm2 | --model llama-1.1b | --model qwen-1.5b-shape]
        [--rounds 5] [--tokens 128] [--threads 2]

A decode step streams every int4 projection, the int8 head and the KV cache; once the model is larger than
the last-level cache, bytes are the time. This builds the model (SmolLM2 from its bundled GGUF, or a
Llama-architecture model of the named shape with seeded random weights: nothing is downloaded), quantizes
it with `rtn-int4{head=int8,zero_grid=float}`, packs the engine weights twice, with float32 and with
float16 unit scales, and decodes `--tokens` tokens after a 16-token prompt on each, interleaved for
`--rounds` rounds. It prints every round, the median tok/s of each layout with the ratio's spread over
rounds, the weight bytes a token reads, and the read bandwidth that implies (compare with the machine's
measured read bandwidth: `torch.ones(2**28).sum()` over a 1 GB tensor, printed too).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-1.1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama's shape, head size 64
    "qwen-1.5b-shape": (1536, 8960, 28, 12, 2, 32000),  # Qwen2.5-1.5B's body (head size 128), a Llama here
}


def build(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    if name == "smollm2":
        from optistack.workloads.loaders import load_smollm2

        model = load_smollm2()[0]
    else:
        hidden, inter, layers, heads, kv, vocab = SHAPES[name]
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                             max_position_embeddings=2048, tie_word_embeddings=False)
        model = LlamaForCausalLM(config).eval()
    return Pipeline.parse("rtn-int4{head=int8,zero_grid=float}").apply(model, PassContext()).model


def decode_ms(runtime, tokens: int) -> float:
    """Median ms of one decode step after a 16-token prompt."""
    runtime.impl.set_length(0, 0)
    prompt = torch.arange(16) + 100
    runtime.forward(prompt, torch.zeros(16, dtype=torch.long), torch.arange(16), torch.tensor([15]))
    tok, times = torch.tensor([7]), []
    for i in range(tokens):
        start = time.perf_counter()
        zero = torch.zeros(1, dtype=torch.long)
        tok = runtime.forward(tok, zero, torch.tensor([16 + i]), zero).argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def step_bytes(weights) -> int:
    """Bytes one decode step reads: every projection and the head (the embedding row and norms are noise)."""
    return weights.nbytes - weights.embed.numel() * weights.embed.element_size()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1.1b", choices=["smollm2", *SHAPES])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from optistack.kernels.llama_engine import EngineWeights

    big = torch.ones(2**28)
    start = time.perf_counter()
    for _ in range(5):
        big.sum()
    read_gbs = 5 * big.nbytes / (time.perf_counter() - start) / 1e9
    del big
    model = build(args.model)
    layouts = {s: EngineWeights.from_model(model, scales=s) for s in ("float32", "float16")}
    del model
    runtimes = {s: w.runtime(1, 16 + args.tokens + 1) for s, w in layouts.items()}
    print(f"model {args.model}; {args.threads} threads; {args.tokens} decode steps after a 16-token prompt; "
          f"read bandwidth (torch.sum over 1 GB): {read_gbs:.1f} GB/s")
    ms: dict[str, list[float]] = {s: [] for s in layouts}
    for r in range(args.rounds):
        for s, rt in runtimes.items():
            ms[s].append(decode_ms(rt, args.tokens))
        print(f"  round {r + 1}: " + ", ".join(f"{s} scales {1e3 / ms[s][-1]:.1f} tok/s" for s in layouts))
    ratios = sorted(a / b for a, b in zip(ms["float32"], ms["float16"]))
    for s, w in layouts.items():
        med = statistics.median(ms[s])
        gb = step_bytes(w) / 1e9
        print(f"  {s} scales: {1e3 / med:.1f} tok/s median, {gb * 1e3:.0f} MB a token, {gb / med * 1e3:.1f} GB/s "
              f"({100 * gb / med * 1e3 / read_gbs:.0f}% of the measured read bandwidth)")
    print(f"  float16 / float32 speed: median {statistics.median(ratios):.3f}x, rounds {ratios[0]:.3f}..{ratios[-1]:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
