"""Load the two bundled models, offline, as (model in eval mode, fp32; tokenizer).

Where their files are (and SmolLM2's one-time GGUF conversion) is `optistack.bundled_models`; the
model-side helpers (`model_device`, `to_device`) are `optistack.core.modeling`. Both are re-exported
here so existing imports keep working.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundled_models import (  # noqa: F401  (re-exported)
    MINILM_ID,
    SMOLLM2_GGUF,
    SMOLLM2_ID,
    cache_root,
    gguf_dir,
    minilm_dir,
    require_transformers,
    smollm2_dir,
    smollm2_gguf,
)
from ..core.modeling import model_device, to_device  # noqa: F401  (re-exported)
from ..core.quiet import quiet_import


def load_minilm() -> tuple[Any, Any]:
    """(model in eval mode, fp32; tokenizer)."""
    require_transformers()
    path = minilm_dir()
    with quiet_import(hf_progress=True):
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(path, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_smollm2(cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(LlamaForCausalLM in eval mode, fp32; tokenizer), from the converted cache."""
    path = smollm2_dir(cache_dir)
    with quiet_import(hf_progress=True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(path)


def count_params(model: Any) -> int:
    """Unique parameter count (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
