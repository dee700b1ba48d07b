"""Quantize the bundled SmolLM2-135M with optistack and write it as a GGUF file llama.cpp and ollama run.

    HF_HUB_OFFLINE=1 python examples/save_gguf.py                          # RTN int4 g32, ~1 min on 2 cores
    HF_HUB_OFFLINE=1 python examples/save_gguf.py --pipeline "gptq{group_size=64,head=int8}" --out smol-gptq.gguf

The same from the command line: `optistack run --model smollm2 --pipeline "rtn-int4{group_size=32,head=int8}"
--save smol.gguf --save-format gguf`. Each layer gets the ggml type that holds its grid as it is (int4
asymmetric -> Q4_1, symmetric -> Q4_0, int8 -> Q8_0, float -> F16); the summary lists the choice and the
largest difference from our own weights (fp16 rounding of the block scales). Then, with llama.cpp:
`llama-cli -m smol.gguf -p "..."`, or in Python `llama_cpp.Llama(model_path="smol.gguf")`.
See docs/gguf.md.
"""
import argparse
import copy

import optistack as ost
from optistack.checkpoints import save_gguf
from optistack.core.pass_protocol import PassContext

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--pipeline", default="rtn-int4{zero_grid=integer,group_size=32,head=int8}")
parser.add_argument("--out", default="smollm2-optistack.gguf")
args = parser.parse_args()

wl = ost.workloads.load("smollm2", ppl_chunks=2)
model = ost.Pipeline.parse(args.pipeline).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
print(f"perplexity: fp32 {wl.evaluate(wl.model)['perplexity']:.2f}, {args.pipeline} {wl.evaluate(model)['perplexity']:.2f}")
written = save_gguf(args.out, model, pipeline=args.pipeline)  # or result.save_gguf(path) on a RunResult
print(written.summary())

try:  # optional: run it in llama.cpp (pip install llama-cpp-python)
    import llama_cpp
except ImportError:
    print("llama-cpp-python is not installed; the file is ready for llama.cpp / ollama")
else:
    llm = llama_cpp.Llama(model_path=str(written.path), n_batch=1, verbose=False)  # n_batch=1: see docs/gguf.md
    out = llm("The with statement is used to", max_tokens=24, temperature=0.0)
    print("llama.cpp says:", out["choices"][0]["text"])
