"""Any Hugging Face text encoder as a workload: MiniLM's workload (cosine to the original model's
pooled embeddings, nearest-neighbour retrieval agreement) on another model and, optionally, the
user's own sentences.

Pooling follows the folder's sentence-transformers `1_Pooling/config.json` (mean, CLS or max) when it
has one, else mean pooling. With data, evaluation takes the first half of the records (at most
`max_eval`) and calibration the rest; without, the bundled MiniLM sentences are used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .data_files import DataRecords, describe_split, split_records
from .minilm import MiniLMWorkload, read_sentences


def pooling_mode(folder: Path | None) -> str:
    """"mean", "cls" or "max", from sentence-transformers' pooling config; "mean" when absent."""
    if folder is None:
        return "mean"
    try:
        cfg = json.loads((folder / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


class EncoderWorkload(MiniLMWorkload):
    """Mean cosine (higher is better) of pooled embeddings to the original model's."""

    def __init__(self, model: Any, tokenizer: Any, records: DataRecords | None = None, model_id: str = "encoder",
                 name: str = "encoder", folder: Path | None = None, batch_size: int = 8, seq_len: int = 128,
                 max_eval: int = 256) -> None:
        self.name, self.model_id, self.records = name, model_id, records
        self.pooling = pooling_mode(folder)
        self._given = (model.eval(), tokenizer)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 1:
            seq_len = min(seq_len, limit)
        self._max_eval = max_eval
        self._split: dict[str, Any] = {"data": "bundled offline sentences (minilm_eval.txt / minilm_calib.txt); "
                                               "no --data given"}
        super().__init__(batch_size=batch_size, seq_len=min(seq_len, 512))

    def _load(self) -> tuple[Any, Any]:
        return self._given

    def _sentences(self) -> tuple[list[str], list[str]]:
        if self.records is None:
            return read_sentences("minilm_eval.txt"), read_sentences("minilm_calib.txt")
        texts = self.records.texts
        ev, cal = split_records(len(texts), 0.5, self._max_eval)
        self._split = describe_split(self.records.source, ev, cal, eval_records=len(ev), calibration_records=len(cal))
        return [texts[i] for i in ev], [texts[i] for i in cal]

    def embed(self, model: Any) -> torch.Tensor:
        if self.pooling == "mean":
            return super().embed(model)
        from ..core.modeling import model_device, to_device
        from .minilm import hidden_states

        parts = []
        with torch.inference_mode():
            for inputs, real in self._eval_batches:
                batch = to_device(inputs, model_device(model))
                hidden = hidden_states(model(**batch))
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].to(hidden.device).unsqueeze(-1).bool()
                    pooled = hidden.masked_fill(~mask, float("-inf")).amax(dim=1)
                parts.append(torch.nn.functional.normalize(pooled, p=2, dim=1)[:real].cpu())
        return torch.cat(parts)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"model_id": self.model_id, "pooling": f"{self.pooling} over attention mask, L2-normalized",
                    "data_split": dict(self._split)})
        return out
