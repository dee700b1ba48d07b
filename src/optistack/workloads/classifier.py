"""Classifiers from a folder: text (`*ForSequenceClassification`) and image (`*ForImageClassification`).

Scored by accuracy when the evaluation data carries labels, else by agreement: the share of inputs
where the candidate predicts the original model's class (both higher is better). Every call, timed or
scored, uses (batch_size, ...) inputs of one shape, so a compiled model never recompiles.

Text data: the user's records (first half evaluation, the rest calibration) or the bundled MiniLM
sentences. Image data: a folder of class subfolders of images (the subfolder name is the label), or,
without one, deterministic synthetic images (the report says so: agreement on noise is a weak signal).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from ..core.errors import WorkloadError
from ..core.modeling import Inputs, model_device, output_field, to_device
from ..core.workload import Metric
from .data_files import DataRecords, describe_split, split_records
from .loaders import count_params

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def logits_of(outputs: Any) -> torch.Tensor:
    """[batch, classes] float32 logits from a ModelOutput, dict, tuple or tensor."""
    return output_field(outputs, "logits", "classifier: logits (batch, classes)", 2).float()


def label_ids(labels: list[Any], config: Any, source: str) -> list[int]:
    """Labels as class ids: ints (or digit strings) as they are, names through config.label2id."""
    label2id = {str(k).lower(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    n = getattr(config, "num_labels", None) or len(label2id)
    out = []
    for label in labels:
        if isinstance(label, bool) or (isinstance(label, (int, float)) and float(label).is_integer()):
            idx = int(label)
        elif isinstance(label, str) and label.strip().lstrip("-").isdigit():
            idx = int(label)
        elif isinstance(label, str) and label.strip().lower() in label2id:
            idx = label2id[label.strip().lower()]
        else:
            raise WorkloadError(f"--data {source}: label {label!r} is neither a class id nor one of the model's "
                                f"labels ({', '.join(sorted(label2id)) or 'none named'})")
        if n and not 0 <= idx < n:
            raise WorkloadError(f"--data {source}: label {label!r} is outside the model's {n} classes")
        out.append(idx)
    return out


class ClassifierWorkload:
    """Shared by the text and image classifiers: batches of inputs, labels or the original's predictions."""

    kind = "classifier"

    def __init__(self, model: Any, eval_batches: list[tuple[dict, int]], calib_batches: list[dict],
                 labels: list[int] | None, name: str, model_id: str, split: dict[str, Any]) -> None:
        if not eval_batches:
            raise WorkloadError(f"{name}: no evaluation inputs")
        self.model, self.name, self.model_id, self._split = model.eval(), name, model_id, split
        self._eval, self._calib, self.labels = eval_batches, calib_batches, labels
        self.metric = Metric("accuracy" if labels is not None else "agreement", higher_is_better=True)
        self._bench_on: dict[str, dict] = {}
        self._reference: torch.Tensor | None = None

    def predict(self, model: Any) -> torch.Tensor:
        device, parts = model_device(model), []
        with torch.inference_mode():
            for inputs, real in self._eval:
                parts.append(logits_of(model(**to_device(inputs, device)))[:real].cpu())
        return torch.cat(parts)

    def run(self, model: Any, batch: Any = None) -> Any:
        """One forward on the first evaluation-shaped batch (calibration data when there is any)."""
        device = model_device(model)
        inputs = batch if batch is not None else self._bench_on.get(str(device))
        if inputs is None:
            source = self._calib[0] if self._calib else self._eval[0][0]
            inputs = self._bench_on[str(device)] = to_device(source, device)
        with torch.inference_mode():
            return model(**inputs)

    def evaluate(self, model: Any) -> dict[str, float]:
        if self._reference is None:
            self._reference = self.predict(self.model).argmax(dim=-1)
        logits = self.predict(model)
        if not torch.isfinite(logits).all():
            return {self.metric.name: math.nan}
        pred = logits.argmax(dim=-1)
        out = {"agreement": (pred == self._reference).float().mean().item()}
        if self.labels is not None:
            out["accuracy"] = (pred == torch.tensor(self.labels)).float().mean().item()
        return out

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        return [((), batch) for batch in self._calib[: max(n, 0)]]

    def extra_measurements(self, model: Any) -> dict[str, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        first = self._eval[0][0]
        return {"model_id": self.model_id, "params": count_params(self.model),
                "batch_shape": {k: list(v.shape) for k, v in first.items()},
                "eval_inputs": sum(real for _, real in self._eval), "metric": self.metric.name,
                "data_split": dict(self._split)}


def _batched(items: list[Any], batch_size: int, encode: Any) -> list[tuple[dict, int]]:
    """(inputs, real rows) per batch; the last one is filled up by repeating items."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        real = len(chunk)
        chunk = chunk + [items[i % len(items)] for i in range(batch_size - real)]
        out.append((encode(chunk), real))
    return out


def text_classifier(model: Any, tokenizer: Any, records: DataRecords | None, name: str, model_id: str,
                    batch_size: int = 8, seq_len: int = 128, max_eval: int = 256) -> ClassifierWorkload:
    from .minilm import read_sentences

    limit = getattr(model.config, "max_position_embeddings", None)
    seq_len = min(seq_len, limit) if isinstance(limit, int) and limit > 1 else seq_len
    if tokenizer.pad_token is None:
        raise WorkloadError(f"{name}: the tokenizer has no pad token, so sentences cannot be batched; set one "
                            "(tokenizer.pad_token = tokenizer.eos_token) and save the folder again")

    def encode(texts: list[str]) -> dict:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    labels = None
    if records is None:
        ev_texts, cal_texts = read_sentences("minilm_eval.txt"), read_sentences("minilm_calib.txt")
        split: dict[str, Any] = {"data": "bundled offline sentences (minilm_eval.txt / minilm_calib.txt); "
                                         "no --data given; scored by agreement with the original"}
    else:
        ev, cal = split_records(len(records.texts), 0.5, max_eval)
        ev_texts, cal_texts = [records.texts[i] for i in ev], [records.texts[i] for i in cal]
        if records.labels is not None:
            labels = label_ids([records.labels[i] for i in ev], model.config, records.source)
        split = describe_split(records.source, ev, cal, eval_records=len(ev), calibration_records=len(cal),
                               labels=records.label_column or "none (scored by agreement with the original)")
    calib = [b for b, _ in _batched(cal_texts, batch_size, encode)]
    return ClassifierWorkload(model, _batched(ev_texts, batch_size, encode), calib, labels, name, model_id, split)


def image_classifier(model: Any, processor: Any, data: str | Path | None, name: str, model_id: str,
                     batch_size: int = 8, max_eval: int = 256) -> ClassifierWorkload:
    def encode(images: list[Any]) -> dict:
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}

    labels = None
    if data is None:
        g = torch.Generator().manual_seed(0)
        size = _image_size(processor)
        images = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(4 * batch_size)]
        ev, cal = range(0, 2 * batch_size), range(2 * batch_size, 4 * batch_size)
        split: dict[str, Any] = {"data": "synthetic noise images (no --data given); scored by agreement with the "
                                         "original, a weak signal: give --data FOLDER of class subfolders"}
    else:
        images, names = _read_image_folder(Path(data))
        ev, cal = split_records(len(images), 0.5, max_eval)
        if names is not None:
            labels = label_ids([names[i] for i in ev], model.config, str(data))
        split = describe_split(str(data), ev, cal, unit="images", eval_images=len(ev), calibration_images=len(cal))
    calib = [b for b, _ in _batched([images[i] for i in cal], batch_size, encode)]
    return ClassifierWorkload(model, _batched([images[i] for i in ev], batch_size, encode), calib, labels, name,
                              model_id, split)


def _image_size(processor: Any) -> int:
    size = getattr(processor, "size", None) or {}
    if isinstance(size, dict):
        return int(size.get("height") or size.get("shortest_edge") or 224)
    return int(size) if isinstance(size, int) else 224


def _read_image_folder(folder: Path) -> tuple[list[Any], list[str] | None]:
    """Images (PIL, RGB) in sorted order, and their class-subfolder names (None for a flat folder)."""
    if not folder.is_dir():
        raise WorkloadError(f"--data {folder}: an image classifier takes a folder of images (one subfolder per "
                            "class, named after the label), not a file")
    try:
        from PIL import Image
    except ImportError as exc:
        raise WorkloadError("reading images needs Pillow; pip install pillow") from exc
    by_class: dict[Path, list[Path]] = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix.lower() in _IMAGE_SUFFIXES:
            by_class.setdefault(f.parent, []).append(f)
    # round-robin over the class folders, so both halves of the split hold every class
    files = [f for rank in range(max(map(len, by_class.values()), default=0))
             for group in by_class.values() if rank < len(group) for f in [group[rank]]]
    if len(files) < 2:
        raise WorkloadError(f"--data {folder}: {len(files)} image(s) found ({', '.join(_IMAGE_SUFFIXES)}); "
                            "at least 2 are needed")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except Exception as exc:
            raise WorkloadError(f"--data {f}: not a readable image: {exc}") from exc
    nested = all(f.parent != folder for f in files)
    return images, ([f.parent.name for f in files] if nested else None)
