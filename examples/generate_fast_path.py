"""`model.generate(...)` is the fast path: SmolLM2-135M through optistack's C++ decode engine, called the way
transformers users already call it (greedy, sampling, a TextIteratorStreamer).

    HF_HUB_OFFLINE=1 python examples/generate_fast_path.py                # about a minute on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/generate_fast_path.py --tokens 64

The chain (docs/decoding.md, "generate() is the fast path"): `rtn-int4{head=int8,zero_grid=float}` (int4
blocks, int8 head), `fuse-kernels` (our kernels for the prefill), `decode-engine` (every later token is
one C++ call). The pass installs `generate` on the model: transformers prepares the call (generation
config, logits processors, stopping criteria, streamer) and our loop decodes on an engine session.
`model.generate.last` says which path a call took. Prints tokens/s of generate() against greedy_decode
(the loop the benchmarks time) and against the same model's own transformers loop.
"""
import argparse
import copy
import threading
import time

import torch
from transformers import GenerationMixin, TextIteratorStreamer

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline
from optistack.generation import greedy_decode

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=128)
parser.add_argument("--pipeline", default="rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine")
args = parser.parse_args()
torch.set_num_threads(2)

wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
tok = wl.tokenizer
result = Pipeline.parse(args.pipeline).apply(copy.deepcopy(wl.model), PassContext(workload=wl))
model = result.model
print("installed:", model.generate)

chat = [{"role": "user", "content": "Explain in two sentences what a context manager does in Python."}]
inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
n = inputs["input_ids"].shape[1]


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


out = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False)
print(f"\ngreedy ({model.generate.last['path']}, {model.generate.last.get('session')}):")
print(tok.decode(out[0, n:], skip_special_tokens=True))

# timing: exactly --tokens new tokens each way (no EOS, so nothing stops early), prefill included
greedy = dict(max_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)

generate_s = best_of(lambda: model.generate(**inputs, **greedy))
decode_s = best_of(lambda: greedy_decode(model, inputs["input_ids"], args.tokens))
own_s = best_of(lambda: GenerationMixin.generate(model, **inputs, **greedy), repeats=1)  # transformers' own loop
for name, s in (("model.generate()", generate_s), ("greedy_decode", decode_s), ("transformers' own loop", own_s)):
    print(f"{name:24s} {args.tokens / s:7.1f} tokens/s  ({s * 1000:.0f} ms for {args.tokens} tokens)")
print(f"generate() / greedy_decode: {decode_s / generate_s:.2f}x tokens/s")

torch.manual_seed(0)
sampled = model.generate(**inputs, max_new_tokens=48, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
print("\nsampled:", tok.decode(sampled[0, n:], skip_special_tokens=True))

streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
worker = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=48, do_sample=False, streamer=streamer))
worker.start()
print("\nstreamed: ", end="", flush=True)
for piece in streamer:
    print(piece, end="", flush=True)
worker.join()
print(f"\n(last call: {model.generate.last})")
