"""Writing a Hugging Face folder: config.json, safetensors shards (+ index), generation config, and the
files that travel with the weights (tokenizer, sentence-transformers pooling) copied from the folder
the model was loaded from. The folder is written beside its destination and renamed into place, so a
failure never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .compressed_tensors import DestinationError

MARKER = "optistack-checkpoint.json"
# Files beside the weights that loaders need: tokenizers, chat templates, sentence-transformers modules.
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
              "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
              "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "modules.json",
              "config_sentence_transformers.json", "sentence_bert_config.json")
COMPANION_DIRS = ("1_Pooling", "2_Normalize")


def source_folder(model: Any) -> Path | None:
    """The folder `model` was loaded from (transformers records it), if it still exists."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def config_dict(model: Any, quantization: dict[str, Any] | None) -> dict[str, Any]:
    """The model's config as a dict, with our quantization_config (or none) and the float dtype."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype.itemsize > 1]
    if floats:
        dtype = str(max(set(floats), key=floats.count)).replace("torch.", "")
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def copy_companions(src: Path | None, dst: Path, tokenizer: Any = None) -> list[str]:
    """Tokenizer (given, else copied from `src`) and sentence-transformers files; names of what was written."""
    written = []
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
        written.append("tokenizer")
    if src is None:
        return written
    for name in COMPANIONS:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
            written.append(name)
    for name in COMPANION_DIRS:
        if (src / name).is_dir() and not (dst / name).exists():
            shutil.copytree(src / name, dst / name)
            written.append(name + "/")
    return written


def prepare_destination(path: str | Path) -> tuple[Path, Path]:
    """(final path, temp folder beside it). An existing folder is replaced only if it is empty or one
    we wrote (it holds our marker): a typo never wipes a folder of the user's."""
    final = Path(path).expanduser()
    if final.exists():
        if not final.is_dir():
            raise DestinationError(f"save_pretrained: {final} exists and is a file; give a folder path")
        if any(final.iterdir()) and not (final / MARKER).is_file():
            raise DestinationError(f"save_pretrained: {final} exists, is not empty and was not written by optistack; "
                                  "choose a new or empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    return final, tmp


def commit_destination(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
