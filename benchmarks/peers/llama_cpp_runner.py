"""Time llama.cpp (through llama-cpp-python) on given prompt ids: TTFT and greedy decode, as JSON.

Run in a subprocess by `test_llama_cpp.py`, so a crash of the engine (the native build segfaults in
batched prompt evaluation on some AMX CPUs) is a result, not the end of the benchmark, and so a build
in another virtualenv can be measured by its own interpreter. Prints one JSON object on stdout.

    python llama_cpp_runner.py --model M.gguf --prompt-ids ids.json --new-tokens 128 --threads 2 \
        --n-batch 1 --repeats 3 [--ttft-only]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True, help="a JSON list of token ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=1, help="prompt tokens per llama_decode call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft-only", action="store_true", help="time prompt evaluations only")
    args = ap.parse_args()

    import llama_cpp
    import numpy as np

    prompt = json.loads(open(args.prompt_ids).read())
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=len(prompt) + args.new_tokens + 16, n_batch=args.n_batch,
                          n_ubatch=args.n_batch, n_threads=args.threads, n_threads_batch=args.threads,
                          logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def prefill() -> tuple[float, int]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = next_token()
        return (time.perf_counter() - start) * 1000.0, token

    def generate() -> tuple[float, list[float], list[int]]:
        ttft, token = prefill()
        tokens, step_ms = [token], []
        for _ in range(args.new_tokens - 1):
            start = time.perf_counter()
            llm.eval([token])
            token = next_token()
            step_ms.append((time.perf_counter() - start) * 1000.0)
            tokens.append(token)
        return ttft, step_ms, tokens

    prefill()  # warm-up: first-call allocations, weight repacking
    ttfts, tokens_per_s, token_ms, tokens = [], [], [], []
    for _ in range(args.repeats):
        if args.ttft_only:
            ttfts.append(prefill()[0])
            continue
        ttft, step_ms, tokens = generate()
        ttfts.append(ttft)
        tokens_per_s.append(1000.0 / statistics.median(step_ms))
        token_ms += step_ms
    info = llama_cpp.llama_print_system_info()
    print(json.dumps({
        "version": llama_cpp.__version__,
        "system_info": info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info),
        "n_batch": args.n_batch, "threads": args.threads, "repeats": args.repeats,
        "ttft_ms": ttfts, "tokens_per_s": tokens_per_s, "token_ms": [round(v, 4) for v in token_ms],
        "tokens": tokens,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
