"""Custom kernels on the bundled SmolLM2-135M: int4 weights (round-to-nearest), then `fuse-kernels`.

    HF_HUB_OFFLINE=1 python examples/fuse_kernels.py          # ~1-2 minutes on 2 CPU cores
                                                              # (+ ~1 minute the first time: C++ build)

Prints what the pass replaced and which backend it chose (and why not the others), the text both
models generate (it may part after a few tokens: the fused int4 decode keeps float32 activations where
Int4Linear rounds them to bf16, so near-ties can break the other way), perplexity of both, and times
greedy decode of both models side by side.
"""
import copy

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.generation import greedy_decode

wl = ost.workloads.load("smollm2", ppl_chunks=1)
int4 = ost.Pipeline.parse("rtn-int4").apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
result = ost.Pipeline.parse("fuse-kernels").apply(copy.deepcopy(int4), PassContext(workload=wl))
fused = result.model
for key, value in result.info.items():
    print(f"  {key}: {value}")
print(fused.model.layers[0].mlp)

prompt = wl.tokenizer("The with statement is used to", return_tensors="pt")["input_ids"]
a, b = greedy_decode(int4, prompt, 20).tokens, greedy_decode(fused, prompt, 20).tokens
print("int4 :", wl.tokenizer.decode(a[0]))
print("fused:", wl.tokenizer.decode(b[0]))

speed = {"int4": [], "int4 + fuse-kernels": []}
for _ in range(3):  # interleaved, so background load hits both alike
    for name, model in (("int4", int4), ("int4 + fuse-kernels", fused)):
        speed[name].append(greedy_decode(model, wl._gen_prompt, 48).metrics()["tokens_per_s"])
for name, values in speed.items():
    print(f"{name:>20}: {sorted(values)[1]:.1f} tokens/s (median of 3)")
print(f"perplexity int4 {wl.evaluate(int4)['perplexity']:.3f}, fused {wl.evaluate(fused)['perplexity']:.3f}")
