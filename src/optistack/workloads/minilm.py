"""Sentence embeddings with all-MiniLM-L6-v2: timed on one padded batch, scored by how closely the
candidate's embeddings match the original model's (cosine, and whether nearest-neighbour retrieval
still picks the same sentences).

Every call, timed or scored, uses exactly (batch_size, seq_len) inputs, so a static-shape compiled or
exported model never recompiles between benchmarking and scoring.

Timing batches are never eval sentences: each row is a calibration sentence with its words shuffled
(seeded by batch index and row), so rows of real length and vocabulary, none of them repeated, and
no batch is the same as another.
"""
from __future__ import annotations

import math
import random
from importlib import resources
from typing import Any, Iterable

import torch

from ..core.errors import WorkloadError
from ..core.modeling import Inputs, model_device, output_field, to_device
from ..core.workload import Metric
from .loaders import MINILM_ID, count_params, load_minilm


def read_sentences(filename: str) -> list[str]:
    """Non-empty lines of a bundled data file."""
    text = resources.files("optistack.workloads").joinpath("data", filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def hidden_states(outputs: Any) -> torch.Tensor:
    """The token embeddings from whatever the model returned, as float32.

    Accepts a ModelOutput/dict with `last_hidden_state`, a tuple/list whose first item holds them (also
    numpy arrays from exported runtimes), or a bare tensor; bf16/fp16 outputs are upcast here.
    """
    return output_field(outputs, "last_hidden_state", "minilm: hidden states (batch, seq, dim)", 3).float()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens then L2 norm: the pooling sentence-transformers uses for this model."""
    mask = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)
    summed = (hidden * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


class MiniLMWorkload:
    """Encoder workload; the metric is mean cosine to the original model's embeddings."""

    name = "minilm"
    kind = "encoder"
    metric = Metric("cosine", higher_is_better=True, scale="relative")

    def __init__(self, batch_size: int = 8, seq_len: int = 128) -> None:
        for label, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WorkloadError(f"minilm: {label} must be a positive integer, got {value!r}")
        if seq_len > 512:
            raise WorkloadError(f"minilm: seq_len must be <= 512 (the model's position limit), got {seq_len}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.model, self.tokenizer = self._load()
        self.sentences, self.calib_sentences = self._sentences()
        self._eval_batches = self._batches(self.sentences)
        self._bench = self._tokenize([self.sentences[i % len(self.sentences)] for i in range(batch_size)])
        self._bench_on: dict[str, dict[str, torch.Tensor]] = {}
        self._reference: torch.Tensor | None = None

    def _load(self) -> tuple[Any, Any]:
        """(model, tokenizer); a subclass for another encoder overrides this and `_sentences`."""
        return load_minilm()

    def _sentences(self) -> tuple[list[str], list[str]]:
        """(evaluation sentences, calibration sentences), disjoint."""
        return read_sentences("minilm_eval.txt"), read_sentences("minilm_calib.txt")

    def _tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            sentences, padding="max_length", truncation=True, max_length=self.seq_len, return_tensors="pt"
        )
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: enc[k] for k in keys if k in enc}

    def _batches(self, sentences: list[str]) -> list[tuple[dict[str, torch.Tensor], int]]:
        """(inputs, real rows) per batch; the last batch is filled up by repeating sentences."""
        out = []
        for start in range(0, len(sentences), self.batch_size):
            chunk = sentences[start : start + self.batch_size]
            real = len(chunk)
            chunk += [sentences[i % len(sentences)] for i in range(self.batch_size - real)]
            out.append((self._tokenize(chunk), real))
        return out

    def timing_batch(self, index: int) -> Inputs | None:
        """The index-th timing batch: shuffled-word calibration sentences (see the module docstring);
        None without calibration sentences (the benchmark then times the default batch)."""
        if not self.calib_sentences:
            return None
        rng = random.Random(0x4D494E49 + 7919 * int(index))
        rows = []
        for _ in range(self.batch_size):
            words = self.calib_sentences[rng.randrange(len(self.calib_sentences))].split()
            rng.shuffle(words)
            rows.append(" ".join(words))
        return (), self._tokenize(rows)

    def run(self, model: Any, batch: Inputs | None = None) -> Any:
        """One forward on `batch` (a timing batch), or on the default batch of eval sentences when None.

        The default batch is moved to the model's device once and kept."""
        device = model_device(model)
        if batch is not None:
            args, inputs = to_device(batch, device)
            with torch.inference_mode():
                return model(*args, **inputs)
        inputs = self._bench_on.get(str(device))
        if inputs is None:
            inputs = self._bench_on[str(device)] = to_device(self._bench, device)
        with torch.inference_mode():
            return model(**inputs)

    def embed(self, model: Any) -> torch.Tensor:
        """(n_sentences, dim) float32 CPU embeddings of the eval set."""
        device = model_device(model)
        parts = []
        with torch.inference_mode():
            for inputs, real in self._eval_batches:
                batch = to_device(inputs, device)
                hidden = hidden_states(model(**batch))
                parts.append(mean_pool(hidden, batch["attention_mask"])[:real].cpu())
        return torch.cat(parts)

    def reference(self) -> torch.Tensor:
        """Embeddings of the original model, computed on first use and kept."""
        if self._reference is None:
            self._reference = self.embed(self.model)
        return self._reference

    def evaluate(self, model: Any) -> dict[str, float]:
        ref = self.reference()
        emb = self.embed(model)
        if emb.shape != ref.shape:
            raise WorkloadError(f"minilm: candidate embeddings have shape {tuple(emb.shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(emb).all():
            return {"cosine": math.nan, "cosine_min": math.nan, "retrieval_top1": math.nan}
        cos = (emb * ref).sum(dim=1)
        agree = (_nearest_other(emb) == _nearest_other(ref)).float().mean()
        return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(), "retrieval_top1": agree.item()}

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """Up to `n` batches of the separate calibration sentences (never the eval set)."""
        return [((), inputs) for inputs, _ in self._batches(self.calib_sentences)[: max(n, 0)]]

    def extra_measurements(self, model: Any) -> dict[str, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": MINILM_ID,
            "params": count_params(self.model),
            "batch_shape": [self.batch_size, self.seq_len],
            "timing": "a fresh batch per round: calibration sentences with shuffled words (never eval sentences)",
            "eval_sentences": len(self.sentences),
            "calibration_sentences": len(self.calib_sentences),
            "pooling": "mean over attention mask, L2-normalized",
        }


def _nearest_other(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (cosine; rows are unit length)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(dim=1)
