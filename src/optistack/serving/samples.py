"""The requests a load test sends: (prompt ids, max new tokens), varied in both lengths, from a workload's data.

`samples_from_workload` takes the smollm2 (or any causal-LM) workload's evaluation text and cuts seeded
windows of `input_tokens` (lo..hi) tokens from it, or for the long-QA workload (`smollm2-qa`) takes its
chat prompts whole (a document with its question: truncating it would drop the question; they are
~1,000 tokens). Output lengths are drawn from `output_tokens` (lo..hi). The same seed gives the same
samples, so stock and optimized backends answer identical requests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from .backend import ServingError

DEFAULT_INPUT_TOKENS = (32, 512)
DEFAULT_OUTPUT_TOKENS = (16, 128)


@dataclass(frozen=True)
class Sample:
    """One request: the prompt's token ids and how many tokens to generate."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def context(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


def _check_range(label: str, value: Any) -> tuple[int, int]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and 1 <= value[0] <= value[1])
    if not ok:
        raise ServingError(f"{label} must be (lo, hi) integers with 1 <= lo <= hi; got {value!r}")
    return int(value[0]), int(value[1])


def _check_count(n: Any) -> int:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ServingError(f"the number of samples must be an integer >= 1; got {n!r}")
    return n


def samples_from_ids(ids: Sequence[int], n: int, *, seed: int = 0, input_tokens: tuple[int, int] = DEFAULT_INPUT_TOKENS,
                     output_tokens: tuple[int, int] = DEFAULT_OUTPUT_TOKENS) -> list[Sample]:
    """`n` windows of a token stream at seeded offsets, each `input_tokens` long (clipped to the stream) and
    asking for `output_tokens` new tokens, both drawn uniformly."""
    n = _check_count(n)
    lo_in, hi_in = _check_range("input_tokens", input_tokens)
    lo_out, hi_out = _check_range("output_tokens", output_tokens)
    ids = [int(t) for t in ids]
    if len(ids) < lo_in:
        raise ServingError(f"the text has {len(ids)} tokens, fewer than input_tokens' lower bound {lo_in}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo_in, min(hi_in, len(ids)))
        start = rng.randint(0, len(ids) - length)
        out.append(Sample(tuple(ids[start:start + length]), rng.randint(lo_out, hi_out)))
    return out


def samples_from_prompts(prompts: Sequence[Sequence[int]], n: int, *, seed: int = 0,
                         output_tokens: tuple[int, int] = DEFAULT_OUTPUT_TOKENS) -> list[Sample]:
    """`n` whole prompts taken in a seeded order (cycling when n > len(prompts)), each with a drawn output length."""
    n = _check_count(n)
    lo_out, hi_out = _check_range("output_tokens", output_tokens)
    if not prompts:
        raise ServingError("no prompts to build samples from")
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [Sample(tuple(int(t) for t in prompts[order[i % len(order)]]), rng.randint(lo_out, hi_out)) for i in range(n)]


def samples_from_workload(workload: Any, n: int = 16, *, seed: int = 0,
                          input_tokens: tuple[int, int] = DEFAULT_INPUT_TOKENS,
                          output_tokens: tuple[int, int] = DEFAULT_OUTPUT_TOKENS) -> list[Sample]:
    """Samples from a causal-LM workload's own data (see the module docstring); a ServingError names a workload
    that has neither evaluation token ids nor QA prompts."""
    if hasattr(workload, "items") and callable(getattr(workload, "prompt_ids", None)):  # long-context QA
        prompts = [workload.prompt_ids(workload.model, item)[0].tolist() for item in workload.items]
        return samples_from_prompts(prompts, n, seed=seed, output_tokens=output_tokens)
    eval_ids = getattr(workload, "eval_token_ids", None)
    if callable(eval_ids):
        return samples_from_ids(eval_ids(), n, seed=seed, input_tokens=input_tokens, output_tokens=output_tokens)
    raise ServingError(f"workload {getattr(workload, 'name', type(workload).__name__)!r} gives no text to build "
                       "requests from: the server scenario needs a causal-LM workload (smollm2, smollm2-qa, a model folder)")
