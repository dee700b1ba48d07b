"""What the decode engine's int8 activations cost, measured where decoding happens: token by token.

    python benchmarks/decode_engine_quality.py [--pipeline "awq{head=int8,zero_grid=float},fuse-kernels"]
        [--chunks 4] [--prompt 32] [--tokens 256] [--kv float16,int8] [--scales float32|float16]

The workload's perplexity is computed by the model's forward over whole chunks: the engine never runs
there. Here each evaluation chunk is prefilled for `--prompt` tokens, then decoded teacher-forced, one
token per call, by the quantized model's own loop (float32 activations) and by the engine (int8
activations), and both perplexities of the true next tokens are printed, with the top-1 agreement of
the two. The fp32 model's decode perplexity is the baseline. The engine runs once per KV cache type of
`--kv` (float16, the default cache, and int8: what the int8 cache costs, token by token).
"""
from __future__ import annotations

import argparse
import copy
import math
import os

import torch


def decode_nll(model, chunk: torch.Tensor, prompt: int, step) -> tuple[float, list[int]]:
    """Summed NLL of chunk[prompt + 1:] given everything before, and the argmax at each step."""
    nll, picks = 0.0, []
    logits = step(None, chunk[:, :prompt])
    for i in range(prompt, chunk.shape[1]):
        target = chunk[0, i]
        logp = torch.log_softmax(logits.float(), dim=-1)[0]
        if i > prompt:
            nll -= float(logp[target])
        picks.append(int(logp.argmax()))
        if i + 1 < chunk.shape[1]:
            logits = step(chunk[:, i], i)
    return nll, picks


def model_stepper(model):
    from transformers import DynamicCache

    state = {}

    def step(tok, pos):
        if tok is None:
            state["cache"] = DynamicCache(config=model.config)
            out = model(input_ids=pos, past_key_values=state["cache"], use_cache=True)
        else:
            out = model(input_ids=tok[:, None], past_key_values=state["cache"], use_cache=True)
        return out.logits[:, -1]
    return step


def engine_stepper(model, decoder, length: int):
    state = {}

    def step(tok, pos):
        if tok is None:
            if "session" in state:
                state["session"].close()
            state["session"] = decoder.open_session(model, 1, length)
            return state["session"].prefill(pos)
        return state["session"].extend(tok[:, None])[:, 0]
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default="awq{head=int8,zero_grid=float},fuse-kernels")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--kv", default="float16,int8", help="KV cache types the engine runs with, comma-separated")
    ap.add_argument("--engines-only", action="store_true",
                    help="skip the fp32 and quantized models' own loops (slow): compare the engine's cache types only")
    ap.add_argument("--scales", default="float32", choices=["float32", "float16"],
                    help="the engine's int4 unit scales (float16: what decode-engine uses with act=int8)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.kernels.llama_engine import EngineWeights
    from optistack.passes.decoding.engine_strategy import EngineDecode
    from optistack.workloads import load

    wl = load("smollm2")
    quant = Pipeline.parse(args.pipeline).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
    weights = EngineWeights.from_model(quant, scales=args.scales)
    kvs = args.kv.split(",")
    decoders = {kv: EngineDecode(weights, 8, "engine", kv) for kv in kvs}
    length = args.prompt + args.tokens
    sums = {"fp32 model": 0.0, "quantized model": 0.0, **{f"engine, {kv} cache": 0.0 for kv in kvs}}
    agree = {kv: 0 for kv in kvs}
    total = 0
    with torch.inference_mode():
        for c in range(args.chunks):
            chunk = wl._chunks[c % len(wl._chunks)][:, :length]
            if args.engines_only:
                pq = []
            else:
                sums["fp32 model"] += decode_nll(wl.model, chunk, args.prompt, model_stepper(wl.model))[0]
                nq, pq = decode_nll(quant, chunk, args.prompt, model_stepper(quant))
                sums["quantized model"] += nq
            total += len(pq)
            for kv, decoder in decoders.items():  # token i sits at the engine's position i
                ne, pe = decode_nll(quant, chunk, args.prompt, engine_stepper(quant, decoder, length))
                sums[f"engine, {kv} cache"] += ne
                agree[kv] += sum(a == b for a, b in zip(pq, pe))
    n = args.chunks * (args.tokens - 1)
    print(f"pipeline: {args.pipeline}; engine scales {args.scales}; {args.chunks} chunks, prompt {args.prompt}, "
          f"{args.tokens} teacher-forced tokens each")
    ppl = {name: math.exp(s / n) for name, s in sums.items() if s or not args.engines_only}
    for name, value in ppl.items():
        print(f"  decode perplexity, {name:24s}: {value:.4f}")
    for kv in kvs:
        rt = weights.runtime(1, 1, kv=kv)
        agreement = f"; top-1 agreement with the quantized model {agree[kv] / total:.4f} ({agree[kv]}/{total})" if total else ""
        print(f"  {kv} cache: {rt.kv_bytes_per_token} bytes a token{agreement}")
    if len(kvs) > 1:
        base = ppl[f"engine, {kvs[0]} cache"]
        for kv in kvs[1:]:
            print(f"  {kv} cache vs {kvs[0]}: perplexity {100 * (ppl[f'engine, {kv} cache'] / base - 1):+.3f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
