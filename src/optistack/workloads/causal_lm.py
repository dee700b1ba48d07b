"""Any Hugging Face causal LM as a workload: SmolLM2's workload (perplexity, prefill timing, TTFT and
tokens/s from our decode loop) on another model and, optionally, the user's own text.

With data, evaluation takes the first records and calibration every later one (split at a record
boundary, so no text is in both; a single record is split at a token). Evaluation never takes more
than half of the tokens, and the perplexity chunks shrink to fit a small file. Without data, the
bundled offline text (Python's reference prose) is split as the smollm2 workload splits it.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import WorkloadError
from .data_files import DataRecords, describe_split
from .smollm2 import SmolLM2Workload

_MIN_EVAL_TOKENS = 16


class CausalLMWorkload(SmolLM2Workload):
    """Perplexity (lower is better) of `model` on `records` (or the bundled text)."""

    def __init__(self, model: Any, tokenizer: Any, records: DataRecords | None = None, model_id: str = "causal-lm",
                 name: str = "causal-lm", seq_len: int = 128, ppl_chunk: int = 512, gen_tokens: int = 128,
                 prompt_tokens: int = 128, ppl_chunks: int = 8) -> None:
        self.name, self.model_id, self.records = name, model_id, records
        self._given = (model.eval(), tokenizer)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 1:  # fit the defaults to a model with short positions
            ppl_chunk, seq_len = min(ppl_chunk, limit), min(seq_len, limit)
            prompt_tokens = min(prompt_tokens, max(1, limit // 2))
            gen_tokens = min(gen_tokens, max(2, limit - prompt_tokens))
        self._split: dict[str, Any] = {"data": "bundled offline text (pydoc_data.topics); no --data given"}
        self._data_eval = self._data_calib = None
        self.eval_keys: list[str] = []  # bundled-text topics, when no data is given
        self.calib_keys: list[str] = []
        if records is not None:
            self._data_eval, self._data_calib = self._split_records(records, tokenizer, ppl_chunk * ppl_chunks)
            have = self._data_eval.numel()
            if have < ppl_chunk * ppl_chunks:
                ppl_chunks = max(1, have // ppl_chunk)
                ppl_chunk = min(ppl_chunk, have)
            seq_len, prompt_tokens = min(seq_len, have), min(prompt_tokens, have)
        super().__init__(seq_len=seq_len, ppl_chunk=ppl_chunk, gen_tokens=gen_tokens, prompt_tokens=prompt_tokens,
                         ppl_chunks=ppl_chunks)

    def _split_records(self, records: DataRecords, tokenizer: Any, wanted: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eval ids, calibration ids) from disjoint records; the split goes into the report."""
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        per = [tokenizer(t, add_special_tokens=False)["input_ids"] + sep for t in records.texts]
        total = sum(map(len, per))
        if total < 2 * _MIN_EVAL_TOKENS:
            raise WorkloadError(f"--data {records.source}: {total} tokens; at least {2 * _MIN_EVAL_TOKENS} are needed "
                                "(half for evaluation, half for calibration)")
        if len(per) == 1:  # one record: split it at a token, first half for evaluation
            ids = per[0]
            cut = min(wanted, len(ids) // 2)
            self._split = {"data": records.source, "eval": f"tokens 0..{cut - 1} of its one record",
                           "calibration": f"tokens {cut}..{len(ids) - 1}", "disjoint": True,
                           "eval_tokens": cut, "calibration_tokens": len(ids) - cut}
            return torch.tensor(ids[:cut]), torch.tensor(ids[cut:])
        n_eval, have = 0, 0
        while n_eval < len(per) - 1 and have < wanted and have + len(per[n_eval]) <= max(total // 2, len(per[0])):
            have += len(per[n_eval])
            n_eval += 1
        n_eval = max(n_eval, 1)
        eval_ids = [i for p in per[:n_eval] for i in p]
        calib_ids = [i for p in per[n_eval:] for i in p]
        if len(eval_ids) < _MIN_EVAL_TOKENS:
            raise WorkloadError(f"--data {records.source}: the evaluation part has {len(eval_ids)} tokens, fewer than "
                                f"{_MIN_EVAL_TOKENS}; give more text")
        self._split = describe_split(records.source, range(0, n_eval), range(n_eval, len(per)),
                                     eval_tokens=len(eval_ids), calibration_tokens=len(calib_ids))
        return torch.tensor(eval_ids), torch.tensor(calib_ids)

    def _load(self, cache_dir: str | None) -> tuple[Any, Any]:
        return self._given

    def _eval_ids(self, needed: int) -> torch.Tensor:
        if self._data_eval is None:
            ids = super()._eval_ids(needed)
            self._split = {**self._split, "eval": f"topics {self.eval_keys[0]}..{self.eval_keys[-1]}",
                           "calibration": f"the other {len(self.calib_keys)} topics", "disjoint": True}
            return ids
        return self._data_eval

    def _calibration_ids(self) -> torch.Tensor:
        return super()._calibration_ids() if self._data_calib is None else self._data_calib

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["model_id"] = self.model_id
        if self._data_eval is not None:
            out["eval_text"] = f"--data {self.records.source}"  # type: ignore[union-attr]
        out["data_split"] = dict(self._split)
        return out
