"""The output head (`lm_head`) of a quantized LM: int8 per output channel, int4, or left as it is.

A small LM streams its head every token, and the head is large: SmolLM2-135M's is 49152 x 576, 113 MB
in float32, more than the whole int4 body (~57 MB). `awq` and `rtn-int4` therefore take
`head=int8|int4|keep`:

- `int8` (default): symmetric int8 with one float32 scale per output channel (`Int8Linear`,
  optistack.layers.int8): 4x fewer bytes, run by our int8 kernel on CPU (`optistack_cpu::int8_matmul`,
  built here when a compiler is found). Measured on SmolLM2 it moves
  perplexity by well under 0.5% (docs/decoding.md).
- `int4`: the same group-wise round-to-nearest int4 as the body (8x fewer bytes; +8% perplexity on
  SmolLM2).
- `keep`: the head stays as it is.

A tied input embedding keeps working: the embedding keeps its float weight; only the head gets the
quantized copy (`embed-int8` after this pass makes the embedding share the int8 head's rows). The head is found as
the model's output embeddings (`get_output_embeddings()`), else a Linear named `lm_head`, and is
changed only while it is still a float `nn.Linear` (a `skip` pattern that let the body pass quantize
it already decided).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers.int8 import Int8Linear

HEAD_CHOICES = ("int8", "int4", "keep")


def int8_kernel() -> str:
    """"cpu-cpp" (our int8 GEMV, built or loaded from the cache now) when it builds here, else "torch"
    (dequantize and multiply: right everywhere, fast nowhere). CUDA inputs always take "torch"."""
    from ...kernels import cpu

    if not cpu.available():
        return "torch"
    try:
        cpu.ensure_built()
    except RuntimeError:
        return "torch"
    return "cpu-cpp"


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the output head, or None when the model has none we recognize."""
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    for name, module in model.named_modules():
        if (head is not None and module is head) or (head is None and name.rsplit(".", 1)[-1] == "lm_head"):
            return name, module
    return None


def _untie(model: nn.Module) -> None:
    """The head no longer shares the embedding's weight: say so in the config, so transformers does
    not tie them again (e.g. `tie_weights()` on save) and overwrite the quantized head."""
    for config in (getattr(model, "config", None),):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else None
        if text is not None and text is not config and getattr(text, "tie_word_embeddings", False):
            text.tie_word_embeddings = False


def quantize_head(model: nn.Module, mode: str, swap_int4: Any = None, skipped: Any = None) -> dict[str, Any]:
    """Apply `head=mode` to the model's output head in place; returns info for the pass's report.
    `swap_int4(name, linear)` quantizes a Linear to int4 the way the calling pass does (int4 mode).
    `skipped`: the layer names the pass's `skip` left out; a head not among them is the body
    quantizer's to decide (quantized with it, or left alone as a tied weight) and is not touched."""
    from ..linears import set_module

    if mode not in HEAD_CHOICES:
        raise ValueError(f"option 'head' must be one of {', '.join(HEAD_CHOICES)}; got {mode!r}")
    found = find_head(model)
    if mode == "keep" or found is None:
        return {"head": "keep" if found is not None else "none"}
    name, head = found
    if skipped is not None and name not in skipped:
        return {"head": "body"}
    if type(head) is not nn.Linear or head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return {"head": type(head).__name__}  # already quantized (e.g. by a skip that let it through)
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    tied = embed is not None and getattr(embed, "weight", None) is head.weight
    with torch.no_grad():
        if mode == "int8":
            set_module(model, name, Int8Linear.from_linear(head, kernel=int8_kernel()))
        else:
            if swap_int4 is None:
                raise ValueError("head=int4 needs the calling pass's int4 quantizer")
            swap_int4(name, head)
    if tied:
        _untie(model)
    return {"head": mode, "head_tied_embedding": tied}
