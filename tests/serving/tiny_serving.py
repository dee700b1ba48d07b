"""A tiny real model and tokenizer to serve in tests: random-weight Llama over the byte-level BPE of
tests/tiny_folders.py (offline, built in about a second), with a small chat template."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_folders import tiny_tokenizer  # noqa: E402

from optistack.testing import tiny_llama  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tokenizer(chat: bool = True):
    tok = tiny_tokenizer()
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def model(tok, context: int = 256, seed: int = 0):
    return tiny_llama(vocab_size=len(tok), seed=seed, max_position_embeddings=context)


def greedy(model, ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The model's own greedy generate() for `ids`, ending at `eos` (None: only at max_new_tokens)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = ([] if eos is None else eos), 0
    config.max_new_tokens, config.do_sample = max_new_tokens, False
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)
    return out[0, len(ids):].tolist()


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def recording(backend_class):
    """A subclass of `backend_class` that keeps every handle it returns (`.handles`), so a test can watch how
    each request ends."""

    class Recording(backend_class):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.handles = []

        def submit(self, *args, **kwargs):
            handle = super().submit(*args, **kwargs)
            self.handles.append(handle)
            return handle

    Recording.__name__ = f"Recording{backend_class.__name__}"
    return Recording
