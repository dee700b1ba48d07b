"""A Qwen2, a Qwen3 and a SmolLM3 quantized by optistack, written by `save_gguf` as llama.cpp's graphs of those
names, run by llama.cpp: perplexity there against ours on the same token ids, and greedy tokens compared.

The models are small and seeded (SmolLM2's 49,152-token vocabulary so the bundled GGUF's tokenizer fits,
hidden 256, 2 layers; Qwen3 with its 128-wide heads: 4 of them over hidden 256; SmolLM3 with 4 layers, the last
without RoPE, as llama.cpp's graph has every fourth), their weights drawn wider
than transformers' default (std 0.1) so the logits are peaked and a wrong norm, bias or RoPE order moves
the perplexity. Ours is the quantized model's own forward. Bars, asserted (this is correctness, not speed):
perplexity within 1%, and teacher-forced top-1 agreement with llama.cpp's logits at least 0.75; for SmolLM3
that agreement must drop when our model rotates its NoPE layer too (measured 0.86 / 0.84 against 0.60 / 0.64:
llama.cpp skips RoPE in the same layer; perplexity over random ids moves too little, 0.2-1.3%, to tell).
Skipped with the reason where llama-cpp-python is not installed.
"""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from test_gguf_roundtrip import _agreement, _our_perplexity, _run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp)")


def _model(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"qwen3": {"head_dim": 128}, "smollm3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}
    config = AutoConfig.for_model(kind, vocab_size=49152, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=4 if kind == "smollm3" else 2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
                                  **extra.get(kind, {}))
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "smollm3"])
@pytest.mark.parametrize("chain", ["rtn-int4{zero_point=false,group_size=64,head=int8}",
                                   "rtn-int4{zero_grid=integer,group_size=32}"])
def test_qwen_gguf_in_llama_cpp(kind, chain, tmp_path):
    from optistack.bundled_models import smollm2_gguf
    from optistack.checkpoints import save_gguf
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline

    model = Pipeline.parse(chain).apply(copy.deepcopy(_model(kind)), PassContext()).model
    written = save_gguf(tmp_path / "m.gguf", model, tokenizer=str(smollm2_gguf()))
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randint(100, 49000, (128,), generator=g).tolist() for _ in range(3)]
    (tmp_path / "chunks.json").write_text(json.dumps(chunks))
    (tmp_path / "prompt.json").write_text(json.dumps(chunks[0][:16]))
    theirs = _run("llama_cpp_logits.py", "score", "--model", str(written.path), "--chunks", str(tmp_path / "chunks.json"),
                  "--prompt-ids", str(tmp_path / "prompt.json"), "--new-tokens", "16", "--n-batch", "1",
                  "--threads", "1")
    assert theirs["status"] == "ok", theirs
    ours = _our_perplexity(model, chunks)
    with torch.inference_mode():
        greedy = model.generate(torch.tensor([chunks[0][:16]]), max_new_tokens=16, do_sample=False)[0, 16:].tolist()
    print(f"\n{kind} {chain} ({written.file_type}): perplexity ours {ours:.3f}, llama.cpp {theirs['perplexity']:.3f} "
          f"({theirs['perplexity'] / ours - 1:+.2%}); greedy {_agreement(greedy, theirs['greedy'])}")
    assert abs(theirs["perplexity"] / ours - 1) < 0.01
    agree = _top1_agreement(model, chunks, theirs["top1"])
    print(f"  teacher-forced top-1 agreement with llama.cpp: {agree:.3f}")
    assert agree >= 0.75  # measured 0.84-0.94 (llama.cpp rounds activations to Q8 blocks, ours stay float)
    if kind == "smollm3":  # llama.cpp skips RoPE where we do: with RoPE in that layer too, ours agrees less
        model.model.layers[3].self_attn.use_rope = 1
        roped = _top1_agreement(model, chunks, theirs["top1"])
        print(f"  with RoPE in layer 3 too: {roped:.3f}")
        assert agree > roped


def _top1_agreement(model, chunks, theirs: list[list[int]]) -> float:
    """The fraction of positions (every chunk, each given its prefix) whose arg-max token is llama.cpp's."""
    same = total = 0
    with torch.inference_mode():
        for ids, top in zip(chunks, theirs):
            ours = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].argmax(-1).tolist()
            same += sum(a == b for a, b in zip(ours, top))
            total += len(top)
    return same / total
