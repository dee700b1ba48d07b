"""llama.cpp (through llama-cpp-python) on given token ids: perplexity over chunks and greedy tokens,
or its own quantization of a GGUF; prints one JSON object. Run in a subprocess by
`test_gguf_roundtrip.py`, so an engine crash is a result, not the end of the run.

    python llama_cpp_logits.py score --model M.gguf --chunks chunks.json --prompt-ids p.json --new-tokens 32
    python llama_cpp_logits.py quantize --model F32.gguf --out Q.gguf --ftype 3   # 3 = MOSTLY_Q4_1

Perplexity: each chunk in a fresh context, every position's logits (`logits_all=True`), the mean
negative log-likelihood of tokens 1.. given their prefix, exactly as optistack's smollm2 workload
scores it. Prompts go in one token per call (`--n-batch 1`): the native build segfaults in batched
prompt evaluation on AMX CPUs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def score(args: argparse.Namespace) -> dict:
    import llama_cpp
    import numpy as np

    chunks = json.loads(open(args.chunks).read())
    prompt = json.loads(open(args.prompt_ids).read())
    n_ctx = max(max(len(c) for c in chunks), len(prompt) + args.new_tokens) + 8
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=args.n_batch, n_ubatch=args.n_batch,
                          n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
    nll, count, top1 = 0.0, 0, []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
        top1.append(logits.argmax(axis=1).tolist())
        top = logits.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
        nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(args.new_tokens):
        token = int(np.asarray(llm.scores[llm.n_tokens - 1]).argmax())
        tokens.append(token)
        llm.eval([token])
    return {"version": llama_cpp.__version__, "perplexity": math.exp(nll / count), "scored_tokens": count,
            "greedy": tokens, "top1": top1}


def quantize(args: argparse.Namespace) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = args.ftype
    params.nthread = args.threads
    rc = llama_cpp.llama_model_quantize(args.model.encode(), args.out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return {"version": llama_cpp.__version__, "out": args.out, "ftype": args.ftype}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("score", "quantize"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunks", help="JSON list of token-id lists, each scored in its own context")
    ap.add_argument("--prompt-ids", help="JSON list of token ids the greedy continuation starts from")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=1)
    ap.add_argument("--out", help="quantize: the output GGUF")
    ap.add_argument("--ftype", type=int, default=3, help="quantize: llama_ftype (2 Q4_0, 3 Q4_1, 7 Q8_0)")
    args = ap.parse_args()
    print(json.dumps(score(args) if args.mode == "score" else quantize(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
