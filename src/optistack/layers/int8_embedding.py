"""`Int8Embedding`: a token embedding stored as int8 codes with one float32 scale per row (row = code * scale).

Why: a lookup reads one row a token, so a float32 table costs nothing in time and a great deal in memory.
It is the largest single tensor of a small or mid-size int4 LM: a ~1.1B Llama with a 32,000-token vocabulary
holds 262 MB of float32 embedding beside 0.55 GB of int4 body (49,152 tokens: 403 MB), and SmolLM2's
113 MB is more than its whole int4 body. As int8 rows it is a quarter of that; for a model whose head is
already the int8 quantization of the same (tied) matrix, it is the head's own codes and scales, no bytes at
all (`embed-int8`, passes/quant/embedding.py). The decode engine reads the codes directly
(csrc/cpu/llama_ops.h `embed_row`: the same float32 products as `forward` here).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.load_registry import register_module
from ..core.load_schema import integer
from .int8 import quantize_rows


class Int8Embedding(nn.Module):
    """Token id -> qweight[id] * scale[id] (int8 [V, H], float32 [V]), float32 out."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int8Embedding":
        """The int8 rows of `emb`'s weight; `codes` (qweight, scale) when they are already made (a tied int8
        head's: then both layers hold the same tensors)."""
        new = cls(emb.num_embeddings, emb.embedding_dim)
        new.qweight, new.scale = codes if codes is not None else quantize_rows(emb.weight)
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [V, H] float32 table, for code that reads `embedding.weight` (exporters,
        `inputs_embeds` helpers); each read dequantizes the whole table."""
        return self.qweight.float() * self.scale.unsqueeze(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)

    def optistack_spec(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}

    @classmethod
    def from_optistack_spec(cls, spec: dict) -> "Int8Embedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


register_module(Int8Embedding, {"num_embeddings": integer(1, 1 << 24), "embedding_dim": integer(1, 1 << 20)})
