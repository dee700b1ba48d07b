"""Resident memory of a model optimized for the decode engine: in the process that optimized it, and loaded.

    python benchmarks/engine_memory.py [--model llama-1.1b | qwen-1.5b-shape | smollm2] [--runs shared,separate,loaded]
        [--quant "rtn-int4{head=int8,zero_grid=float}"] [--vocab N] [--gguf FILE]

Each variant runs in a fresh subprocess: build the model (seeded random weights of the named shape, or the
bundled SmolLM2), apply `QUANT,fuse-kernels,decode-engine{share_weights=...}` in place (no pipeline runner:
its protective copies are issue 25's subject, not the engine's), drop everything but the optimized model,
decode 32 tokens, and print resident memory (VmRSS), its peak (VmHWM) and the bytes of distinct tensor
storages the model and its engine hold. `loaded` is what a server holds: the model saved by one process
and `optistack.load_model`ed by a fresh one, which then decodes the same; it also prints the interpreter's
resident memory before the model (torch, transformers and the model's class imported) and both figures
over it. `--gguf FILE` adds llama.cpp (llama-cpp-python) on a GGUF of the same shape: its resident memory
after the same decode (its weights are mmap'ed: resident once touched). For the same weights on both sides,
`--vocab 49152 --quant "rtn-int4{zero_point=false,group_size=64,head=int8}" --gguf F` with F the file
`benchmarks/peers/beyond_cache_decode.py` writes (its Q4_0 + Q8_0 head).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile

QUANT = "rtn-int4{head=int8,zero_grid=float}"
CHAIN = "%s,fuse-kernels,decode-engine{check_prompts=0,share_weights=%s}"


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
        tensors += [w.embed, w.embed_s, w.head_q, w.head_s] + [t for b in w.blocks for p in (b.qkv, b.o, b.gate_up, b.down)
                                                     for t in (p.q, p.s, p.zc)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _base(name: str, meta: bool = False, vocab: int | None = None):
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from engine_bytes import SHAPES

    if name == "smollm2":
        from optistack.workloads.loaders import load_smollm2

        model = load_smollm2()[0]
        if meta:
            model = model.to("meta")
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, shape_vocab = SHAPES[name]
    vocab = vocab or shape_vocab
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(config).eval()
    return LlamaForCausalLM(config).eval()


def ours(name: str, share: bool, save_to: str | None = None, quant: str = QUANT, vocab: int | None = None) -> dict:
    import torch

    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.generation import greedy_decode

    torch.set_num_threads(2)
    model = _base(name, vocab=vocab)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    chain = CHAIN % (quant, "yes" if share else "no")
    model = Pipeline.parse(chain).apply(model, PassContext()).model
    if save_to:  # the steps as a run records them; the original's types and shapes from a weightless copy
        from optistack.core.persist import save_model

        class Step:
            status, info = "applied", {}

            def __init__(self, p):
                from optistack.core.pass_protocol import config_of, pass_text

                self.pass_name, self.text, self.config = p.name, pass_text(p), config_of(p)

        save_model(save_to, model, _base(name, meta=True, vocab=vocab), [Step(p) for p in Pipeline.parse(chain).passes], {})
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    greedy_decode(model, torch.arange(16).unsqueeze(0) + 100, 32)
    return {"fp32_bytes": fp32, "held_bytes": _held(model), **_status()}


def loaded(name: str, folder: str) -> dict:
    """A fresh process that loads the saved model and decodes: what a server holds (its baseline: the
    interpreter with torch, transformers and optistack imported, before the model)."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401  (what the model's class imports is the interpreter's)

    import optistack as ost
    from optistack.generation import greedy_decode

    torch.set_num_threads(2)
    base = _status()
    model = ost.load_model(folder)
    after_load = _status()
    greedy_decode(model, torch.arange(16).unsqueeze(0) + 100, 32)
    return {"held_bytes": _held(model), "baseline_rss": base["VmRSS"], "load_peak": after_load["VmHWM"],
            "fp32_bytes": 0, **_status()}


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
    ap.add_argument("--runs", default="shared,separate,loaded",
                    help="shared, separate (int4 modules kept), loaded (saved, then loaded in a fresh process)")
    ap.add_argument("--quant", default=QUANT, help="the quantizing step before fuse-kernels,decode-engine")
    ap.add_argument("--vocab", type=int, help="the vocabulary size (default: the shape's; 49152 = SmolLM2's, as "
                    "benchmarks/peers/beyond_cache_decode.py builds its GGUF)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, _, arg = args.child.partition(":")
        out = (llama_cpp(arg) if kind == "llama.cpp" else loaded(args.model, arg) if kind == "loaded"
               else ours(args.model, kind in ("shared", "save"), arg if kind == "save" else None, args.quant, args.vocab))
        print(json.dumps(out))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tmp = tempfile.mkdtemp(prefix="engine-memory-")
    runs = []
    for run in args.runs.split(","):
        runs += [f"save:{tmp}/m", f"loaded:{tmp}/m"] if run == "loaded" else [run]
    runs += [f"llama.cpp:{args.gguf}"] if args.gguf else []
    print(f"model {args.model}: resident memory after 16 prompt + 32 decoded tokens (each in its own process)")
    gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
    try:
        for run in runs:
            extra_args = ["--quant", args.quant] + (["--vocab", str(args.vocab)] if args.vocab else [])
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, *extra_args, "--child", run], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"  {run}: failed\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            kind = run.partition(":")[0]
            if kind == "llama.cpp":
                extra = f", file {gb(r['file_bytes'])}"
            elif kind == "loaded":
                extra = (f", tensors held {gb(r['held_bytes'])}; the interpreter before the model "
                         f"{gb(r['baseline_rss'])}, peak while loading {gb(r['load_peak'])}; over the interpreter: "
                         f"RSS {gb(r['VmRSS'] - r['baseline_rss'])}, peak {gb(r['VmHWM'] - r['baseline_rss'])}")
            else:
                extra = f", tensors held {gb(r['held_bytes'])} (fp32 model {gb(r['fp32_bytes'])})"
            label = {"shared": "optistack, one copy (share_weights=yes)",
                     "separate": "optistack, int4 modules kept (share_weights=no)",
                     "save": "optistack, optimized and saved (share_weights=yes)",
                     "loaded": "optistack, the saved model loaded in a fresh process"}.get(kind, "llama.cpp")
            print(f"  {label}: RSS {gb(r['VmRSS'])}, peak {gb(r['VmHWM'])}{extra}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
