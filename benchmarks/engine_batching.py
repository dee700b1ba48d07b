"""The C++ engine's serving numbers on SmolLM2-135M: decode steps by batch, prefill by path, generate().

    python benchmarks/engine_batching.py                       # rtn-int4 chain, 5 interleaved rounds
    python benchmarks/engine_batching.py --chain "awq{head=int8,zero_grid=float},fuse-kernels,decode-engine" --rounds 7

Every round times, one after the other (so machine drift hits all alike):
- one engine call of B decode rows, each request at its own position after a 128-token prompt, for
  B = 1, 2, 4, 8 (median of 32 steps): tokens/s = B / step time; where the CPU has AMX, B = 8 once more
  with the rows on AMX tiles (`amx_batch=8`, what the serving backend uses);
- the prefill of a 128-token prompt: the engine on AMX tiles (where the CPU has them) or on the int8 chunk
  GEMM (where it has not), the engine on the VNNI rows only, and the model's own forward (the
  `prefill=model` path, cache copied into the engine);
- `model.generate()` (greedy, 128 new tokens) and `greedy_decode` on the same prompt: decode tokens/s.
Every round is printed, then the medians and the ratios; `--json` writes them with the machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

CHAIN = "rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine{check_prompts=0}"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def decode_step_ms(runtime, batch: int, g, amx_batch: int = 0) -> float:
    import torch

    slots = runtime.acquire(batch)
    runtime.impl.amx_batch = amx_batch
    try:
        runtime.prefill([torch.randint(100, 40000, (128,), generator=g).tolist() for _ in range(batch)], slots)
        tok, slot_t, pos = torch.randint(100, 40000, (batch,), generator=g), torch.tensor(slots), [128] * batch
        times = []
        for i in range(32):
            start = time.perf_counter()
            tok = runtime.forward(tok, slot_t, torch.tensor(pos), torch.arange(batch)).argmax(-1)
            times.append((time.perf_counter() - start) * 1000.0)
            pos = [p + 1 for p in pos]
        return statistics.median(times)
    finally:
        runtime.impl.amx_batch = 0
        runtime.release(slots)


def prefill_ms(model, prompt, mode: str, chunk_path: bool) -> float:
    """`chunk_path`: the engine's prompt rows on its chunk path (AMX tiles or the int8 GEMM, the defaults);
    else on the VNNI rows."""
    import torch

    strategy = model.optistack_decode
    before = strategy.prefill_mode
    strategy.prefill_mode = mode

    def once():
        with torch.inference_mode(), strategy.open_session(model, 1, 256) as s:
            impl = s.runtime.impl
            amx_rows, gemm_rows = impl.amx_rows, impl.gemm_rows
            if not chunk_path:
                impl.amx_rows = impl.gemm_rows = 0
            try:
                s.prefill(prompt)
            finally:
                impl.amx_rows, impl.gemm_rows = amx_rows, gemm_rows
    try:
        once()
        return median_ms(once, 5)
    finally:
        strategy.prefill_mode = before


def generate_tokens_per_s(model, prompt, tokens: int) -> float:
    """Decode tokens/s of `model.generate()`: tokens after the first over the time from the first to the
    last, stamped by a streamer as transformers hands them out (what a streaming user sees)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.prompt = [], True

        def put(self, value):
            if not self.prompt:
                self.times.append(time.perf_counter())
            self.prompt = False

        def end(self):
            pass

    stamps = Stamps()
    with torch.inference_mode():
        # eos_token_id=[]: every call makes `tokens` tokens, as greedy_decode does (min_new_tokens would add a
        # logits processor that greedy_decode does not run)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, eos_token_id=[],
                             do_sample=False, streamer=stamps)
    assert out.shape[1] == prompt.shape[1] + tokens and len(stamps.times) == tokens
    return (tokens - 1) / (stamps.times[-1] - stamps.times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", default=CHAIN)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    import optistack as ost
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode

    torch.set_num_threads(args.threads)
    wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
    model = Pipeline.parse(args.chain).apply(copy.deepcopy(wl.model), PassContext(workload=wl)).model
    weights = model.optistack_decode.weights
    runtime = weights.runtime(8, 512)
    amx = bool(runtime.impl.amx_rows)  # the CPU has AMX tiles (else the chunk path is the int8 GEMM)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, 128), generator=g)
    rows: list[dict] = []
    for r in range(args.rounds):
        row = {f"decode_b{b}_ms": decode_step_ms(runtime, b, g) for b in (1, 2, 4, 8)}
        if amx:  # the batch of 8 decode rows on tiles too
            row["decode_b8_amx_ms"] = decode_step_ms(runtime, 8, g, amx_batch=8)
        row[f"prefill_engine_{'amx' if amx else 'gemm'}_ms"] = prefill_ms(model, prompt, "engine", True)
        row["prefill_engine_vnni_ms"] = prefill_ms(model, prompt, "engine", False)
        row["prefill_model_ms"] = prefill_ms(model, prompt, "model", False)
        row["generate_tok_s"] = generate_tokens_per_s(model, prompt, 128)
        row["greedy_decode_tok_s"] = greedy_decode(model, prompt, 128).metrics()["tokens_per_s"]
        rows.append(row)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print("\nmedians:")
    for b in (1, 2, 4, 8):
        print(f"  decode batch {b}: {med[f'decode_b{b}_ms']:.2f} ms a step, {1000 * b / med[f'decode_b{b}_ms']:.0f} tokens/s")
    print(f"  batch 8 / batch 1 tokens/s: {8 * med['decode_b1_ms'] / med['decode_b8_ms']:.2f}x")
    if "decode_b8_amx_ms" in med:
        print(f"  batch 8 on AMX tiles: {med['decode_b8_amx_ms']:.2f} ms a step, "
              f"{8 * med['decode_b1_ms'] / med['decode_b8_amx_ms']:.2f}x batch 1")
    for k in ("prefill_engine_amx_ms", "prefill_engine_gemm_ms", "prefill_engine_vnni_ms", "prefill_model_ms"):
        if k in med:
            print(f"  {k}: {med[k]:.1f}")
    print(f"  generate() {med['generate_tok_s']:.0f} tokens/s, greedy_decode {med['greedy_decode_tok_s']:.0f}: "
          f"{med['generate_tok_s'] / med['greedy_decode_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"chain": args.chain, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                       "rounds": rows, "medians": med}, fh, indent=2)


if __name__ == "__main__":
    main()
