"""Decode SmolLM2-135M with optistack's C++ decode engine: one call per token for the whole model.

    HF_HUB_OFFLINE=1 python examples/decode_engine.py                 # about a minute on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/decode_engine.py --tokens 64 --batch 4

The chain (docs/decoding.md, "The decode engine"):
- `rtn-int4{head=int8,zero_grid=float}`: int4 weights in the decoder blocks, an int8 head (`awq` instead
  gives lower perplexity and takes longer: `@llm-decode` uses it).
- `fuse-kernels`: our C++ kernels for the model's own forward (int4 weights dequantized to bf16).
- `decode-engine`: every token after the first is one call into csrc/cpu/llama_decode.cpp, and so is the
  prompt (`prefill=auto` with int8 activations: its chunk on AMX tiles where the CPU has them, else on the
  engine's int8 GEMM; the "prefill" printed says who ran it). Where the CPU has no AMX its decode rows read
  the projections as panels of 16 rows (a second copy of the int4 codes: "panels" says how many MB; about
  1.3x a decode step on a Zen 4, 1.6x a batch of 8; for models of up to 256 MB of codes, `panels=yes|no` to
  choose). At apply it measures how often it picks the model's own next token (teacher-forced) and refuses
  below 0.9.
Prints tokens/s and TTFT of the engine and of the same model's own decode loop, and the text.
"""
import argparse
import copy

import torch

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=48)
parser.add_argument("--batch", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(2)

wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
prompt = wl.tokenizer("The with statement is used to", return_tensors="pt")["input_ids"].repeat(args.batch, 1)
result = Pipeline.parse("rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine").apply(
    copy.deepcopy(wl.model), PassContext(workload=wl))
if not result.modified or getattr(result.model, "optistack_decode", None) is None:
    raise SystemExit(f"the engine did not apply here: {result.info}")
print("engine:", {k.split(".", 1)[1]: v for k, v in result.info.items() if k.startswith("decode-engine.")})

greedy_decode(result.model, prompt, 2)  # warm-up
fast = greedy_decode(result.model, prompt, args.tokens)
own = greedy_decode(result.model, prompt, args.tokens, use_strategy=False)  # the model's own loop
for name, g in (("own loop", own), ("engine", fast)):
    m = g.metrics()
    print(f"{name:9s} {m['tokens_per_s'] * args.batch:7.1f} tokens/s (batch {args.batch})  TTFT {m['ttft_ms']:6.1f} ms")
same = (fast.tokens == own.tokens).all(dim=0).float()
print(f"tokens identical to the own loop up to position {int(same.cumprod(0).sum())} of {args.tokens}")
print(repr(wl.tokenizer.decode(fast.tokens[0])))
