"""Tiny random-weight transformers for fast pass tests (never for accuracy claims)."""
from __future__ import annotations

import torch


def tiny_llama(vocab_size: int = 100, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab_size)
    return LlamaForCausalLM(LlamaConfig(**(cfg | overrides))).eval()


def tiny_bert(vocab_size: int = 100, seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               vocab_size=vocab_size)
    return BertModel(BertConfig(**(cfg | overrides))).eval()


def tiny_llama_workload(model, vocab_size: int = 128, seq: int = 24, n: int = 4):
    """A generic workload over random token ids: example input + eval inputs, also the calibration set."""
    from optistack.workloads.generic import GenericWorkload

    g = torch.Generator().manual_seed(1)
    ids = [{"input_ids": torch.randint(0, vocab_size, (1, seq), generator=g), "use_cache": False} for _ in range(n)]
    return GenericWorkload(model, ids[0], eval_inputs=ids[1:])
