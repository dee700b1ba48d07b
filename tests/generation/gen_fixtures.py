"""Tiny random-weight causal LMs (Llama, Qwen2) with a tiny byte-level BPE tokenizer of the same vocabulary,
and helpers to compare our generate() with transformers' own loop on them."""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from tiny_models import tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedTokenizerFast
from transformers.generation.streamers import BaseStreamer

CORPUS = ["the quick brown fox jumps over the lazy dog", "generate tokens fast through the decode engine",
          "speculative decoding verifies drafts in one forward pass", "a static cache keeps one shape per step",
          "left padding never attended; positions start at zero", "stop strings end the text where they appear"] * 4


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS in memory: <pad>=0, <s>=1, </s>=2 (Llama's default bos/eos ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def vocab() -> int:
    return len(tiny_tokenizer())


def llama(seed: int = 0):
    return tiny_llama(vocab_size=vocab(), seed=seed, num_hidden_layers=2)


def qwen2(seed: int = 0, kind: str = "qwen2"):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab(),
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def qwen3(seed: int = 0):
    """qwen2's shape with Qwen3's per-head q/k norms (and its default head size of 128: heads wider than hidden)."""
    return qwen2(seed, "qwen3")


MODELS = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


def prompt(batch: int = 1, length: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab(), (batch, length), generator=g)


def left_padded(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows of 8 positions: 3, 0 and 5 pad tokens on the left."""
    ids = prompt(3, 8, seed)
    mask = torch.ones_like(ids)
    for row, pads in enumerate((3, 0, 5)):
        mask[row, :pads] = 0
        ids[row, :pads] = 0
    return ids, mask


def own_generate(model, *args, **kwargs):
    """transformers' own generate() on the module (the class's method, whatever is installed)."""
    target = getattr(model, "_orig_mod", model)
    return GenerationMixin.generate(target, *args, **kwargs)


def ours(model, *args, **kwargs):
    """model.generate(...) recording warnings; fails when optistack warned (it was meant to be served)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model.generate(*args, **kwargs)
    mine = [str(w.message) for w in seen if str(w.message).startswith("optistack")]
    assert not mine, mine
    assert model.generate.last["path"] == "strategy", model.generate.last
    return out


def optistack_warnings(seen) -> list[str]:
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning) and str(w.message).startswith("optistack")]


def fresh(model):
    return copy.deepcopy(model)


class Recorder(BaseStreamer):
    """A streamer that records every `put` (as lists) and counts `end` calls."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1
