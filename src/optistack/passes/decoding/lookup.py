"""Draft proposers: n-gram prompt lookup, and a smaller draft model decoding greedily with its own cache.

A proposer sees the whole token sequence so far (prompt + accepted tokens, 1-D) and proposes up to `k`
next tokens; the target model then checks them all in one forward pass.
"""
from __future__ import annotations

from typing import Any

import torch

from ...generation import cache_kwarg, logits_of


class PromptLookup:
    """Find the latest earlier occurrence of the sequence's last n tokens (n from `max_ngram` down to
    `min_ngram`) and propose the tokens that followed it. No model, no state: answers copied from the
    prompt (QA, summaries, code edits) are proposed whole."""

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def reset(self, model: Any, prompt: torch.Tensor) -> None:
        pass

    def propose(self, seq: torch.Tensor, k: int) -> list[int]:
        length = seq.numel()
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = seq[length - n:]
            windows = seq[: length - 1].unfold(0, n, 1)  # windows ending before the last token
            hits = (windows == pattern).all(dim=1).nonzero().flatten()
            if hits.numel():
                start = int(hits[-1]) + n
                return seq[start : start + k].tolist()
        return []

    def accepted(self, seq_len: int) -> None:
        pass


class DraftModel:
    """Greedy proposals from a small model sharing the target's vocabulary, with its own KV cache kept
    in step with the accepted tokens (cropped after each verification)."""

    def __init__(self, draft: Any) -> None:
        self.draft = draft
        self.cache: Any = None
        self.cached = 0  # tokens of the sequence the draft cache holds

    def reset(self, model: Any, prompt: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.cache, self.cached = DynamicCache(config=self.draft.config), 0

    def propose(self, seq: torch.Tensor, k: int) -> list[int]:
        if k < 1:
            return []
        arg = cache_kwarg(self.draft)
        ids = seq[self.cached :].view(1, -1)
        proposed: list[int] = []
        for _ in range(k):
            out = self.draft(input_ids=ids, use_cache=True, **{arg: self.cache})
            self.cached += ids.shape[1]
            ids = logits_of(out, last_only=True)[:, -1].argmax(dim=-1, keepdim=True)
            proposed.append(int(ids))
        return proposed

    def accepted(self, seq_len: int) -> None:
        """The sequence now has `seq_len` tokens; forget cached proposals beyond the accepted prefix."""
        extra = self.cached - (seq_len - 1)  # the newest token (the target's own) is never cached yet
        if extra > 0:
            self.cache.crop(-extra)
            self.cached -= extra
