"""Fast batch-1 decoding of SmolLM2-135M on CPU: int4 body + int8 head + fused kernels, one compiled step.

    HF_HUB_OFFLINE=1 python examples/compiled_decode.py                 # a few minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/compiled_decode.py --tokens 32 --head int4

What the chain does (docs/decoding.md, "One compiled decode step"):
- `rtn-int4{head=int8}`: group-wise int4 weights in the decoder blocks, the lm_head (tied to the
  embedding here) as int8 per output channel; the embedding keeps its float weight.
- `fuse-kernels`: our C++ kernels (RMSNorm, SwiGLU, int4 GEMV; the int8 head is ours already).
- `kv-cache{impl=static}`: a preallocated cache, so every decode step has the same shapes.
- `compile{freezing=true,cpp_wrapper=true}`: the decode step as one Inductor graph, weights frozen,
  kernels called from C++ (no Python per kernel). The first call compiles (timed apart).
The example checks the compiled chain decodes the same tokens as the same chain run eagerly.
"""
import argparse
import copy
import time

import torch

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=64)
parser.add_argument("--head", default="int8", choices=("int8", "int4", "keep"))
args = parser.parse_args()
torch.set_num_threads(2)

wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
prompt = wl.tokenizer("The with statement is used to", return_tensors="pt")["input_ids"]
eager_text = f"rtn-int4{{head={args.head}}},fuse-kernels,kv-cache{{impl=static}}"
eager = Pipeline.parse(eager_text).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
compiled = Pipeline.parse("compile{freezing=true,cpp_wrapper=true}").apply(eager, PassContext()).model

start = time.perf_counter()
greedy_decode(compiled, prompt, 2)
print(f"first call (compiles the decode step): {time.perf_counter() - start:.1f} s")
fast = greedy_decode(compiled, prompt, args.tokens)
slow = greedy_decode(compiled._orig_mod, prompt, args.tokens)  # the same model, eager
print("token-identical to eager:", torch.equal(fast.tokens, slow.tokens))
for name, g in (("eager", slow), ("compiled", fast)):
    m = g.metrics()
    print(f"{name:9s} {m['tokens_per_s']:6.1f} tokens/s  TTFT {m['ttft_ms']:6.1f} ms")
print(repr(wl.tokenizer.decode(fast.tokens[0])))
