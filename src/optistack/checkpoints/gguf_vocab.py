"""The tokenizer in GGUF's `tokenizer.*` keys: copied from a GGUF file, or built from a transformers
tokenizer the way llama.cpp's converter lays it out.

From a GGUF (the bundled SmolLM2 came from one, or the user names one): every `tokenizer.*` key is
copied as it is, so llama.cpp tokenizes exactly as it did for that file.

From a transformers fast tokenizer with a byte-level BPE model (GPT-2 style: SmolLM2, Llama 3, Qwen):
`tokenizer.ggml.model = "gpt2"`, the tokens in id order (ids past the tokenizer's end up to the
model's vocab_size become `[PAD{id}]`, type UNUSED), token types (special added tokens CONTROL, other
added tokens USER_DEFINED, the rest NORMAL), merges as "a b", the bos/eos/unk/pad ids, add_bos and
the chat template. llama.cpp picks its pre-tokenizer regex by `tokenizer.ggml.pre`; its converter
recognises it by hashing the tokenization of a probe text, which we do not repeat: it is "default"
unless the caller names one (`tokenizer_pre=`, e.g. "smollm", "llama-bpe", "qwen2"). Other tokenizer
models (SentencePiece, WordPiece) are refused: pass a GGUF with the same vocabulary as `tokenizer`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .compressed_tensors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


def source_gguf(folder: Path | None) -> Path | None:
    """The GGUF a cached HF folder was converted from (bundled_models' marker), if it is still there."""
    if folder is None or not (folder / "optistack-source.json").is_file():
        return None
    from ..bundled_models import SMOLLM2_GGUF, smollm2_gguf

    try:
        stamp = json.loads((folder / "optistack-source.json").read_text())
        if stamp.get("gguf") == SMOLLM2_GGUF:
            path = smollm2_gguf()
            return path if path.stat().st_size == stamp.get("size") else None
    except Exception:
        return None
    return None


def copy_from_gguf(writer: Any, path: Path, vocab_size: int) -> str:
    """Write every tokenizer.* key of the GGUF at `path`; returns a one-line description."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError(f"{path}: this GGUF has no tokenizer.ggml.tokens to copy")
    n = len(fields["tokenizer.ggml.tokens"].data)
    if n != vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {n} tokens, the model's vocab_size is {vocab_size}")
    for key, field in fields.items():
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None
    return f"copied from {path.name} ({n} tokens, pre={pre})"


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"the tokenizer is a {type(tokenizer).__name__} with no fast (tokenizers) backend; "
                              "save_gguf reads byte-level BPE vocabularies from it: pass tokenizer=<a .gguf "
                              "with the same vocabulary> instead")
    return json.loads(backend.to_str())


def write_from_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> str:
    """Write the tokenizer.* keys of a byte-level BPE transformers tokenizer; returns a description."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    pre_tok = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in pre_tok:
        raise CheckpointError(f"the tokenizer's model is {model.get('type')!r}"
                              f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
                              "; save_gguf builds GGUF vocabularies for byte-level BPE (GPT-2 style) only: pass "
                              "tokenizer=<a .gguf with the same vocabulary> instead")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"the tokenizer has token id {max(by_id)}, past the model's vocab_size {vocab_size}")
    tokens, token_types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, NORMAL) if i in by_id else UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # GGUF has no empty arrays, and llama.cpp refuses a gpt2 vocabulary without merges
        raise CheckpointError("the BPE tokenizer has no merges; llama.cpp's gpt2 vocabulary needs them")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            add(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return f"built from the transformers tokenizer ({len(by_id)} tokens, {len(merges)} merges, pre={pre or 'default'})"
