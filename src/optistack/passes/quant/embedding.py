"""`embed-int8`: the token embedding as int8 rows (`Int8Embedding`), or as the tied int8 head's own rows.

Why: after an int4 body and an int8 head, the float32 embedding is the largest tensor a small or mid-size
LM still holds, though a lookup reads one row a token (a ~1.1B Llama with 32,000 tokens: 262 MB of its
0.87 GB; SmolLM2: 113 MB of 0.20 GB). As int8 rows with one scale each it is a quarter of that. Where the
head was quantized from the same matrix (`head=int8` on a model with tied embeddings: SmolLM2), its codes
and scales are exactly the embedding's int8 rows, so the embedding takes them and holds no bytes of its own.

A row's error is at most half a step of its own scale (its largest magnitude / 254), the head's own grid;
on SmolLM2 perplexity moved 19.525 -> 19.519 after `rtn-int4{head=int8,zero_grid=float}` and 15.8765 -> 15.8775
after `awq{head=int8,zero_grid=float}` (16 chunks, docs/passes.md). The
decode engine reads the codes directly; `save_gguf` writes them as Q8_0 (llama.cpp's int8 blocks);
`save_pretrained` writes the dequantized float rows, which transformers loads as a plain embedding.
An embedding that is not a plain `nn.Embedding` (a scaled subclass, `max_norm`), or whose matrix a float head
still reads (tied, the head not quantized: int8 rows would be bytes beside it), is left alone with the reason.
"""
from __future__ import annotations

from typing import Any

from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult


def _bytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class EmbedInt8Pass(ConfiguredPass):
    """The input embedding as int8 rows with a float32 scale each (shared with a tied int8 head)."""

    name = "embed-int8"
    takes = frozenset({MODULE})
    lossy = True
    copy_on_write = True  # swaps in a new layer; never writes into its input's tensors

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import torch
        from torch import nn

        from ...layers.int8 import Int8Linear, quantize_rows
        from ...layers.int8_embedding import Int8Embedding
        from ..linears import set_module

        getter = getattr(model, "get_input_embeddings", None)
        emb = getter() if callable(getter) else None
        if isinstance(emb, Int8Embedding):
            return PassResult(model, modified=False, info={"reason": "the embedding is int8 already"})
        if emb is None or type(emb) is not nn.Embedding:
            why = ("no input embedding" if emb is None
                   else f"the input embedding is a {type(emb).__name__}, not a plain nn.Embedding")
            return PassResult(model, modified=False, info={"reason": why})
        if emb.max_norm is not None:
            return PassResult(model, modified=False, info={"reason": "the embedding renormalizes rows (max_norm)"})
        if emb.weight.device.type != "cpu" or emb.weight.dtype != torch.float32:  # Int8Embedding gives float32
            return PassResult(model, modified=False, info={"reason": f"the embedding is {emb.weight.dtype} on "
                                                                     f"{emb.weight.device.type}, not float32 on the CPU"})
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if getattr(head, "weight", None) is emb.weight:  # int8 rows would be bytes beside the float matrix it keeps
            return PassResult(model, modified=False, info={
                "reason": "the embedding's matrix is also the float head's (tied): int8 rows would add bytes; "
                          "quantize the head first (head=int8), whose rows the embedding then shares"})
        name = next(n for n, m in model.named_modules() if m is emb)
        before = _bytes(emb.weight)
        with torch.no_grad():
            codes = quantize_rows(emb.weight)
            shared = (isinstance(head, Int8Linear) and head.qweight.shape == codes[0].shape
                      and torch.equal(head.qweight, codes[0]) and torch.equal(head.scale.float(), codes[1]))
            if shared:  # the tied head's own rows: the same codes and scales, held once
                codes = (head.qweight, head.scale)
            new = Int8Embedding.from_embedding(emb, codes)
        set_module(model, name, new)
        after = 0 if shared else _bytes(new.qweight, new.scale)
        return PassResult(model, modified=True, info={
            "embedding": "int8 rows, the int8 head's own" if shared else "int8 rows",
            "embedding_mb": f"{before / 2**20:.1f} -> {after / 2**20:.1f}"})
