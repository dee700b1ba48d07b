"""Tiny random-weight models and inputs: fast enough for a unit test, never for accuracy claims.

One per layer layout passes must handle: Llama (nn.Linear, RMSNorm), BERT (encoder), GPT-2 (transformers
`Conv1D`, lm_head tied to the embedding), GPT-NeoX (fused interleaved query_key_value, LayerNorm with bias),
Phi-3 (fused qkv_proj and gate_up_proj), T5 (encoder-decoder, tied head), OPT (ReLU MLP), a small CNN and
an MLP. Every builder seeds torch first, so the same arguments give the same weights. The transformers
builders import transformers when called. `ARCHITECTURES` maps a name to (builder, inputs builder) for
tests that sweep every pass over every layout.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def tiny_llama(vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads over 2 KV heads; `overrides` go to LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab_size)
    return LlamaForCausalLM(LlamaConfig(**(cfg | overrides))).eval()


def tiny_bert(vocab_size: int = 100, seed: int = 0, num_labels: int | None = None, **overrides: Any) -> nn.Module:
    """BertModel (an encoder), or BertForSequenceClassification with `num_labels` classes."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               vocab_size=vocab_size)
    if num_labels is None:
        return BertModel(BertConfig(**(cfg | overrides))).eval()
    return BertForSequenceClassification(BertConfig(**(cfg | {"num_labels": num_labels} | overrides))).eval()


def tiny_gpt2(vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    """Conv1D projections (weight [in, out]); lm_head.weight is transformer.wte.weight."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size, bos_token_id=0,
               eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**(cfg | overrides))).eval()


def tiny_gpt_neox(vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, vocab_size=vocab_size)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**(cfg | overrides))).eval()


def tiny_phi3(vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, vocab_size=vocab_size, pad_token_id=0,
               bos_token_id=1, eos_token_id=1)
    return Phi3ForCausalLM(Phi3Config(**(cfg | overrides))).eval()


def tiny_t5(vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    """Encoder-decoder with a tied head; its forward reads `self.wo.weight.dtype`."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
               vocab_size=vocab_size, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(T5Config(**(cfg | overrides))).eval()


def tiny_opt(vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
               max_position_embeddings=128, vocab_size=vocab_size, pad_token_id=1)
    return OPTForCausalLM(OPTConfig(**(cfg | overrides))).eval()


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Conv2d + BatchNorm + ReLU stages, then a Linear MLP head (32 -> 64 -> 10); takes [N, 3, H, W]."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()


def tiny_mlp(*widths: int, activation: Callable[[], nn.Module] = nn.GELU, seed: int = 0) -> nn.Module:
    """Linear layers through `widths` (default 16 -> 64 -> 8) with `activation` between them."""
    widths = widths or (16, 64, 8)
    if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"tiny_mlp needs at least two positive int widths (input, ..., output), got {widths}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([activation()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).eval()


def token_inputs(vocab_size: int = 100, seq: int = 16, n: int = 4, seed: int = 1, **extra: Any) -> list[dict]:
    """`n` batches of one random token sequence (ids 2..vocab_size-1), with `extra` keyword inputs."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, vocab_size, (1, seq), generator=g), **extra} for _ in range(n)]


def t5_inputs(vocab_size: int = 100, seq: int = 16, n: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, vocab_size, (1, seq), generator=g),
             "decoder_input_ids": torch.randint(2, vocab_size, (1, seq // 2), generator=g), "use_cache": False}
            for _ in range(n)]


def image_inputs(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(n)]


# name -> (model builder, inputs builder): the first input is the example, the rest evaluation inputs
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], Callable[[], list]]] = {
    "llama": (tiny_llama, lambda: token_inputs(use_cache=False)),
    "bert": (tiny_bert, token_inputs),
    "gpt2": (tiny_gpt2, lambda: token_inputs(use_cache=False)),
    "gpt-neox": (tiny_gpt_neox, lambda: token_inputs(use_cache=False)),
    "phi3": (tiny_phi3, lambda: token_inputs(use_cache=False)),
    "t5": (tiny_t5, t5_inputs),
    "opt": (tiny_opt, lambda: token_inputs(use_cache=False)),
    "cnn": (tiny_cnn, image_inputs),
}


def tiny_llama_workload(model: nn.Module, vocab_size: int = 128, seq: int = 24, n: int = 4) -> Any:
    """A generic workload over random token ids: example input + eval inputs, also the calibration set."""
    from ..workloads.generic import GenericWorkload

    g = torch.Generator().manual_seed(1)
    ids = [{"input_ids": torch.randint(0, vocab_size, (1, seq), generator=g), "use_cache": False} for _ in range(n)]
    return GenericWorkload(model, ids[0], eval_inputs=ids[1:])
