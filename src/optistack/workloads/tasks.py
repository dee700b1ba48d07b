"""Which task a model folder is for, from its config.json (`architectures`) or the user's `--task`.

The task decides the workload: how the model is called and scored (perplexity for causal LMs,
cosine to the original's embeddings for encoders, accuracy or agreement for classifiers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import WorkloadError, closest

CAUSAL_LM, ENCODER, SEQ_CLS, IMAGE_CLS = "causal-lm", "encoder", "sequence-classification", "image-classification"
TASKS = (CAUSAL_LM, ENCODER, SEQ_CLS, IMAGE_CLS)

# Architecture-name endings, checked in order (the first that matches wins).
_SUFFIXES = (
    ("ForCausalLM", CAUSAL_LM),
    ("LMHeadModel", CAUSAL_LM),
    ("ForSequenceClassification", SEQ_CLS),
    ("ForImageClassification", IMAGE_CLS),
)
# Files sentence-transformers writes beside a model: such a folder is a sentence encoder.
_SENTENCE_MARKERS = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def check_task(task: str | None) -> str | None:
    """`task` if it is a known task name (or None); a clear error otherwise."""
    if task is None or task in TASKS:
        return task
    raise WorkloadError(f"unknown task '{task}'{closest(str(task), TASKS)}; valid tasks: {', '.join(TASKS)}")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, parsed as JSON (never executed)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WorkloadError(f"{folder} has no config.json, so it is not a Hugging Face model folder; expected a "
                            "folder with config.json and *.safetensors, a .gguf file, or module:factory") from exc
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise WorkloadError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def infer_task(config: dict[str, Any], folder: Path | None = None, task: str | None = None) -> str:
    """The task for this config: `task` when given, else from `architectures` (or the folder's files)."""
    if check_task(task) is not None:
        return task  # type: ignore[return-value]
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    sentence_folder = folder is not None and any((folder / m).is_file() for m in _SENTENCE_MARKERS)
    for arch in map(str, archs):
        for suffix, name in _SUFFIXES:
            if arch.endswith(suffix):
                return name
    if sentence_folder:
        return ENCODER
    for arch in map(str, archs):  # a bare backbone (BertModel, XLMRobertaModel): its output is embeddings
        if arch.endswith("Model") and not arch.endswith("PreTrainedModel"):
            return ENCODER
    where = f" in {folder / 'config.json'}" if folder is not None else ""
    raise WorkloadError(f"cannot infer the task from architectures={archs}{where}; pass --task "
                        f"(one of {', '.join(TASKS)})")
