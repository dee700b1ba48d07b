"""Int4 rounding methods on the ~1.1B random-weight Llama: logits error against the fp32 model.

    python benchmarks/gptq_logits_1b.py [--groups 64,128] [--methods rtn,gptq,awq,awq+gptq]
        [--calib-samples 16] [--calib-seq-len 128] [--eval-windows 8] [--eval-len 256] [--n-grid 20]
        [--awq-options judge_z=2] [--gptq-options awq_check=true]

The model is the `llama-1.1b` shape of benchmarks/engine_bytes.py (TinyLlama's body: hidden 2048, 22
layers, 32 heads, 4 kv heads) with SmolLM2's 49,152-token vocabulary, as benchmarks/peers/
beyond_cache_decode.py builds it, seeded (`torch.manual_seed(0)`, Hugging Face's initialization): real
text can then be fed to it. Calibration is token ids of the smollm2 workload's calibration text;
evaluation is `--eval-windows` windows of `--eval-len` ids of its evaluation text (never calibrated on).

The fp32 model's logits on the evaluation windows are computed once and kept; then for every group size
and method a fresh fp32 model is built from the seed, quantized with integer zero points (the exportable
grid), and scored. Memory: one float model plus one quantized one at a time (about 6 GB). Scores, per
method, over every evaluated position:

- rel MSE: sum (l_q - l)^2 / sum l^2 over the logits;
- KL: mean KL(p || p_q) of the next-token distributions, in nats;
- top-1: fraction of positions whose arg-max token is the fp32 model's.

The int4 layers are scored through their dequantized weights in float32 (`Int4Linear.dequantized_weight`),
so the numbers are the rounding method's error alone (the int4 kernel's bfloat16 activations would add
the same small error to every method). Pass seconds are wall time of the passes on a shared machine.

What this model can and cannot show: random Gaussian weights have no outlier weights and its activations
no outlier channels, the very thing AWQ's scales exist for; what remains is GPTQ's use of the inputs'
correlations, which random layers have less of than trained ones. Read the result as "does the method
still help where its main lever is missing", not as a prediction for a trained 1.1B model.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB = 49152  # SmolLM2's tokenizer, whose calibration and evaluation text feed the model
METHODS = {
    "rtn": "rtn-int4{{group_size={g},zero_grid=integer}}",
    "gptq": "gptq{{group_size={g},zero_grid=integer{c}{q}}}",
    "awq": "awq{{group_size={g},zero_grid=integer{c}{a}}}",
    "awq+gptq": "awq{{group_size={g},zero_grid=integer,quantize=false{c}{a}}},gptq{{group_size={g},zero_grid=integer{c}{q}}}",
}


def build(seed: int = 0):
    sys.path.insert(0, str(HERE))
    from engine_bytes import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, _ = SHAPES["llama-1.1b"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False)).eval()


def dequantize_int4(model) -> None:
    """Every Int4Linear -> an fp32 nn.Linear of its dequantized weight (the rounding, without the kernel)."""
    from optistack.layers.int4 import Int4Linear
    from optistack.passes.linears import set_module

    for name, m in list(model.named_modules()):
        if isinstance(m, Int4Linear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight().float())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            set_module(model, name, lin)


@torch.no_grad()
def logits(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=w[None], use_cache=False).logits[0].float() for w in windows])


def scores(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    rel = float((out - ref).double().pow(2).sum() / ref.double().pow(2).sum())
    logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    return {"rel_mse": rel, "kl": kl, "top1": top1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--n-grid", type=int, default=20, help="awq's alpha grid")
    ap.add_argument("--awq-options", default="", help="extra awq options, e.g. search_samples=4")
    ap.add_argument("--gptq-options", default="", help="extra gptq options, e.g. awq_check=true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gptq_quality import cpu_name, run_pipeline

    from optistack.core.pass_protocol import PassContext
    from optistack.workloads import load

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    wl = load("smollm2", ppl_chunk=args.eval_len, ppl_chunks=args.eval_windows)
    wl.model = None  # only its text is used: calibration windows and the held-out evaluation ids
    windows = torch.tensor(wl.eval_token_ids()).view(args.eval_windows, args.eval_len)
    ctx = PassContext(workload=wl)
    calib = f",calib_samples={args.calib_samples},calib_seq_len={args.calib_seq_len}"
    awq = f",n_grid={args.n_grid}" + (f",{args.awq_options}" if args.awq_options else "")
    gptq = f",{args.gptq_options}" if args.gptq_options else ""
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.1f}; calibration {args.calib_samples} x "
          f"{args.calib_seq_len} tokens, evaluation {args.eval_windows} x {args.eval_len}", flush=True)
    model = build()
    ref = logits(model, windows)
    checksum = float(model.lm_head.weight.double().sum())
    del model
    gc.collect()
    rows = []
    for g in (int(x) for x in args.groups.split(",")):
        for method in methods:
            text = METHODS[method].format(g=g, c=calib, a=awq, q=gptq)
            model = build()
            assert float(model.lm_head.weight.double().sum()) == checksum, "the seeded build is not reproducible"
            model, seconds = run_pipeline(text, model, ctx)
            dequantize_int4(model)
            s = scores(ref, logits(model, windows))
            del model
            gc.collect()
            rows.append((method, g, s, seconds))
            print(f"  {method:9s} g{g:<4d} rel MSE {s['rel_mse']:.4e}  KL {s['kl']:.4e}  top-1 {s['top1']:.4f}  "
                  f"pass {seconds:6.0f} s (loaded machine)   {text}", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print("| method | group | logits rel MSE | KL (nats) | top-1 agreement | pass seconds (loaded) |")
    print("|---|---|---|---|---|---|")
    for method, g, s, seconds in rows:
        print(f"| {method} | {g} | {s['rel_mse']:.4f} | {s['kl']:.4f} | {s['top1']:.3f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
