"""SmolLM2-135M-Instruct as a causal LM: timed on a 1 x seq_len prefill, scored by perplexity on
offline English prose, with generation speed (TTFT, time per token) from our own decode loop.

Text comes from the standard library's `pydoc_data.topics` (Python's reference prose, always
installed, no download). Evaluation takes topics from the start of the sorted keys, calibration from
the end, and the two key sets never meet. All evaluation chunks have the same length, so a
static-shape compiled model does not recompile while being scored.

Timing batches are 1 x seq_len windows of the calibration text at seeded offsets, never eval text.
"""
from __future__ import annotations

import math
import platform
import random
import warnings
from typing import Any, Iterable

import torch

from ..core.errors import WorkloadError
from ..core.modeling import Inputs, model_device, to_device
from ..core.workload import Metric
from ..generation import CacheUnsupportedError, generation_measurements, logits_of
from .loaders import SMOLLM2_ID, count_params, load_smollm2

_SEP = "\n\n"


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def split_topic_keys(eval_tokens_needed: int, count_tokens: Any) -> tuple[list[str], list[str]]:
    """(eval keys, calibration keys): eval takes sorted keys from the start until it has enough tokens,
    calibration gets every remaining key, in reverse order. Disjoint by construction."""
    keys = sorted(_topics())
    have, eval_keys = 0, []
    eval_tokens_needed += 64  # margin: tokens of joined text can differ slightly from the per-topic sum
    for key in keys:
        if have >= eval_tokens_needed:
            break
        eval_keys.append(key)
        have += count_tokens(_topics()[key]) + 1
    taken = set(eval_keys)
    calib_keys = [k for k in reversed(keys) if k not in taken]
    return eval_keys, calib_keys


class SmolLM2Workload:
    """Causal-LM workload; the metric is perplexity (lower is better)."""

    name = "smollm2"
    kind = "causal-lm"
    metric = Metric("perplexity", higher_is_better=False, scale="relative")

    def __init__(
        self,
        seq_len: int = 128,
        ppl_chunk: int = 512,
        gen_tokens: int = 128,
        prompt_tokens: int = 128,
        ppl_chunks: int = 8,
        cache_dir: str | None = None,
    ) -> None:
        opts = {"seq_len": seq_len, "ppl_chunk": ppl_chunk, "prompt_tokens": prompt_tokens, "ppl_chunks": ppl_chunks}
        for label, value in {**opts, "gen_tokens": gen_tokens}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WorkloadError(f"smollm2: {label} must be a positive integer, got {value!r}")
        if gen_tokens < 2:
            raise WorkloadError(f"smollm2: gen_tokens must be >= 2 (time per token needs a decode step), got {gen_tokens}")
        if ppl_chunk < 2:
            raise WorkloadError(f"smollm2: ppl_chunk must be >= 2 (a chunk predicts ppl_chunk - 1 tokens), got {ppl_chunk}")
        self.seq_len, self.ppl_chunk, self.ppl_chunks = seq_len, ppl_chunk, ppl_chunks
        self.gen_tokens, self.prompt_tokens = gen_tokens, prompt_tokens
        self.model, self.tokenizer = self._load(cache_dir)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(seq_len, ppl_chunk, prompt_tokens + gen_tokens)
        if limit is not None and longest > limit:
            raise WorkloadError(f"smollm2: sequences of {longest} tokens exceed the model's limit of {limit}")

        needed = ppl_chunk * ppl_chunks
        eval_ids = self._eval_ids(needed)
        if eval_ids.numel() < needed:
            raise WorkloadError(f"smollm2: eval text has {eval_ids.numel()} tokens, fewer than the {needed} needed")
        self._chunks = eval_ids[:needed].view(ppl_chunks, 1, ppl_chunk)
        self._prompt = eval_ids[:seq_len].view(1, seq_len)
        self._gen_prompt = eval_ids[:prompt_tokens].view(1, prompt_tokens)
        self._prompt_on: dict[str, torch.Tensor] = {}
        self._calib_ids: torch.Tensor | None = None

    def _load(self, cache_dir: str | None) -> tuple[Any, Any]:
        """(model, tokenizer); a subclass for another causal LM overrides this and the two below."""
        return load_smollm2(cache_dir)

    def _eval_ids(self, needed: int) -> torch.Tensor:
        """At least `needed` evaluation token ids (1-D); never overlapping `_calibration_ids`."""
        self.eval_keys, self.calib_keys = split_topic_keys(needed, self._count)
        return self._encode(self.eval_keys)

    def _calibration_ids(self) -> torch.Tensor:
        return self._encode(self.calib_keys)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode(self, keys: list[str]) -> torch.Tensor:
        text = _SEP.join(_topics()[k] for k in keys)
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    @property
    def eval_tokens(self) -> int:
        """Tokens whose probability is scored: each chunk predicts all but its first token."""
        return self.ppl_chunks * (self.ppl_chunk - 1)

    def eval_token_ids(self) -> list[int]:
        """The scored evaluation text as token ids (what the serving load test cuts its prompts from)."""
        return self._chunks.reshape(-1).tolist()

    def timing_batch(self, index: int) -> Inputs:
        """The index-th timing batch: a 1 x seq_len window of calibration text at a seeded offset."""
        if self._calib_ids is None:
            self._calib_ids = self._calibration_ids()
        ids = self._calib_ids
        offset = random.Random(0x534D4F4C + 7919 * int(index)).randrange(ids.numel() - self.seq_len + 1)
        return (), {"input_ids": ids[offset : offset + self.seq_len].view(1, -1).clone()}

    def run(self, model: Any, batch: Inputs | None = None) -> Any:
        """One prefill without KV cache of `batch` (a timing batch), or of the eval prompt when None."""
        device = model_device(model)
        if batch is not None:
            ids = to_device(batch[1]["input_ids"], device)
        else:
            ids = self._prompt_on.get(str(device))
            if ids is None:
                ids = self._prompt_on[str(device)] = to_device(self._prompt, device)
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False)

    def evaluate(self, model: Any) -> dict[str, float]:
        """Perplexity over fixed-length, non-overlapping chunks; NaN when the logits are not finite."""
        device = model_device(model)
        nll = 0.0
        with torch.inference_mode():
            for chunk in self._chunks:
                ids = to_device(chunk, device)
                logits = logits_of(model(input_ids=ids, use_cache=False))[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                nll += loss.item()
        mean_nll = nll / self.eval_tokens
        ppl = math.nan if not math.isfinite(mean_nll) else math.exp(min(mean_nll, 709.0))
        return {"perplexity": ppl, "eval_tokens": float(self.eval_tokens)}

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """Up to `n` 1 x seq_len windows of the calibration topics (disjoint from the eval topics)."""
        if self._calib_ids is None:
            self._calib_ids = self._calibration_ids()
        count = min(max(n, 0), self._calib_ids.numel() // self.seq_len)
        return [((), {"input_ids": self._calib_ids[i * self.seq_len : (i + 1) * self.seq_len].view(1, -1)}) for i in range(count)]

    def extra_measurements(self, model: Any) -> dict[str, float]:
        """TTFT / time per output token / tokens/s / p99 from a greedy decode after one warm-up, with the
        raw samples (`generation_measurements`); {} (with a warning) when the model cannot be called
        with a KV cache."""
        prompt = to_device(self._gen_prompt, model_device(model))
        try:
            return generation_measurements(model, prompt, self.gen_tokens)
        except CacheUnsupportedError as exc:
            warnings.warn(f"smollm2: no generation metrics: {exc}", stacklevel=2)
            return {}

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": f"{SMOLLM2_ID} (Q4_1 GGUF, dequantized to fp32)",
            "params": count_params(self.model),
            "batch_shape": [1, self.seq_len],
            "timing": "a fresh 1 x seq_len window of calibration text per round (never eval text)",
            "eval_tokens": self.eval_tokens,
            "eval_chunk": [self.ppl_chunks, self.ppl_chunk],
            "eval_text": f"pydoc_data.topics (Python {platform.python_version()}): {', '.join(self.eval_keys)}",
            "generation": {"prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens},
        }
