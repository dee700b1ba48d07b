"""Resident memory of a model optimized for the decode engine, with and without one copy of the weights.

    python benchmarks/engine_memory.py [--model llama-1.1b | qwen-1.5b-shape | smollm2] [--gguf FILE]

Each variant runs in a fresh subprocess: build the model (seeded random weights of the named shape, or the
bundled SmolLM2), apply `rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine{share_weights=...}`
in place (no pipeline runner: its protective copies are issue 25's subject, not the engine's), drop
everything but the optimized model, decode 32 tokens, and print resident memory (VmRSS), its peak (VmHWM)
and the bytes of distinct tensor storages the model and its engine hold. `--gguf FILE` adds llama.cpp
(llama-cpp-python) on a GGUF of the same shape: its resident memory after the same decode (its weights
are mmap'ed: resident once touched).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

CHAIN = "rtn-int4{head=int8,zero_grid=float},fuse-kernels,decode-engine{check_prompts=0,share_weights=%s}"


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _held(model) -> int:
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    w = getattr(getattr(model, "optistack_decode", None), "weights", None)
    if w is not None:
        tensors += [w.embed, w.head_q, w.head_s] + [t for b in w.blocks for p in (b.qkv, b.o, b.gate_up, b.down)
                                                     for t in (p.q, p.s, p.zc)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def ours(name: str, share: bool) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from engine_bytes import SHAPES

    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode

    torch.set_num_threads(2)
    if name == "smollm2":
        from optistack.workloads.loaders import load_smollm2

        model = load_smollm2()[0]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, inter, layers, heads, kv, vocab = SHAPES[name]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)).eval()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    model = Pipeline.parse(CHAIN % "yes" if share else "no").apply(model, PassContext()).model
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    greedy_decode(model, torch.arange(16).unsqueeze(0) + 100, 32)
    return {"fp32_bytes": fp32, "held_bytes": _held(model), **_status()}


def llama_cpp(path: str) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_batch=1, n_threads=2, verbose=False)
    tokens = list(range(100, 116))
    llm.eval(tokens)
    for _ in range(32):
        llm.eval([llm.sample(temp=0.0)])
    return {"file_bytes": os.path.getsize(path), **_status()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1.1b", choices=["llama-1.1b", "qwen-1.5b-shape", "smollm2"])
    ap.add_argument("--gguf", help="a GGUF of the same model for llama.cpp's side")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, _, arg = args.child.partition(":")
        print(json.dumps(llama_cpp(arg) if kind == "llama.cpp" else ours(args.model, kind == "shared")))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = ["shared", "separate"] + ([f"llama.cpp:{args.gguf}"] if args.gguf else [])
    print(f"model {args.model}: resident memory after 16 prompt + 32 decoded tokens (each in its own process)")
    for run in runs:
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", run], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"  {run}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
        extra = (f", tensors held {gb(r['held_bytes'])} (fp32 model {gb(r['fp32_bytes'])})" if "held_bytes" in r
                 else f", file {gb(r['file_bytes'])}")
        label = {"shared": "optistack, one copy (share_weights=yes)",
                 "separate": "optistack, int4 modules kept (share_weights=no)"}.get(run, "llama.cpp")
        print(f"  {label}: RSS {gb(r['VmRSS'])}, peak {gb(r['VmHWM'])}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
