"""Qwen3 and SmolLM3 on optistack's decode engine, and a Qwen3 GGUF llama.cpp reads: nothing downloaded.

    HF_HUB_OFFLINE=1 python examples/qwen3_and_smollm3.py              # about a minute on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/qwen3_and_smollm3.py --gguf q3.gguf

The models are small, seeded and random (Qwen3: per-head q/k norms, heads of 128 wider than the hidden size,
as Qwen3-0.6B; SmolLM3: a layer without RoPE every fourth), so the text means nothing; the point is what runs:
- `rtn-int4{head=int8},fuse-kernels,decode-engine{act=int16}` (the exact mode): `generate()` runs on the
  C++ engine and gives the quantized model's own greedy tokens, which this checks, and how much faster.
- `save_gguf` writes the Qwen3 as llama.cpp's "qwen3" graph (int4 -> Q4_0/Q4_1, the int8 head -> Q8_0).
Real checkpoints go the same way: `optistack run --model ./Qwen3-0.6B --pipeline @llm-decode --save out`,
then `optistack serve out` (docs/decoding.md, "Which models"; docs/gguf.md, "Qwen2 and Qwen3").
"""
import argparse
import copy
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=32)
parser.add_argument("--gguf", default=None, help="also write the quantized Qwen3 here as a GGUF file")
args = parser.parse_args()
torch.set_num_threads(2)

SHAPES = {
    "qwen3": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=128),
    "smollm3": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def timed_generate(model, ids):
    kw = dict(max_new_tokens=args.tokens, do_sample=False, eos_token_id=[], pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **(kw | {"max_new_tokens": 2}))  # warm: first calls build caches and sessions
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    return out, args.tokens / (time.perf_counter() - start)


for kind, shape in SHAPES.items():
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=2048, max_position_embeddings=1024, **shape)
    quant = Pipeline.parse("rtn-int4{head=int8},fuse-kernels").apply(
        AutoModelForCausalLM.from_config(config).eval(), PassContext()).model
    engine = Pipeline.parse("decode-engine{act=int16,check_prompts=0}").apply(copy.deepcopy(quant), PassContext())
    if getattr(engine.model, "optistack_decode", None) is None:
        raise SystemExit(f"{kind}: the engine did not apply here: {engine.info}")
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(1))
    own, own_rate = timed_generate(copy.deepcopy(quant), ids)
    fast, fast_rate = timed_generate(engine.model, ids)
    same = torch.equal(own, fast)
    print(f"{kind}: generate() on {engine.model.generate.last['session']}: {fast_rate:.0f} tok/s against the model's "
          f"own loop {own_rate:.0f} tok/s ({fast_rate / own_rate:.1f}x); greedy tokens identical: {same}")
    if not same:
        raise SystemExit(f"{kind}: the exact mode gave other tokens than the quantized model's own generate()")
    if kind == "qwen3" and args.gguf:
        from optistack.bundled_models import smollm2_gguf
        from optistack.checkpoints import save_gguf

        torch.manual_seed(0)
        config = AutoConfig.for_model(kind, vocab_size=49152, max_position_embeddings=1024, **shape)
        model = Pipeline.parse("rtn-int4{zero_point=false,group_size=64,head=int8}").apply(
            AutoModelForCausalLM.from_config(config).eval(), PassContext()).model
        print(save_gguf(args.gguf, model, tokenizer=str(smollm2_gguf())).summary())  # SmolLM2's vocabulary
