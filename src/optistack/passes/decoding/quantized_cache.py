"""A KV cache stored as int8 or int4 codes with per-token, per-group scales (our own; no quanto/hqq).

Each new key/value vector (one token, one head) is split into groups of `group_size` channels; a group
keeps `bits`-bit unsigned codes plus an fp16 scale and fp16 minimum (asymmetric, so skewed key
channels keep their full code range). Quantizing per token makes the cache appendable and croppable
token by token, so it composes with speculative decoding. Attention reads the dequantized past plus
the current step's exact states. int4 codes are packed two to a byte.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp16 scale, fp16 min) for x of shape (..., T, D), groups along the last dim;
    all three keep the token dim at -2 so they append and crop alike."""
    shape = x.shape
    g = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8).half()
    lo = lo.half()
    codes = ((g - lo.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8).reshape(shape)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.squeeze(-1), lo.squeeze(-1)  # scale, min: (..., D // group_size)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    shape = codes.shape
    g = codes.reshape(*shape[:-1], shape[-1] // group_size, group_size).float()
    return (g * scale.float().unsqueeze(-1) + lo.float().unsqueeze(-1)).reshape(shape).to(dtype)


class QuantizedKVLayer(CacheLayerMixin):
    """One layer's quantized keys and values, (batch, kv_heads, tokens, ...) along dim -2."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, bits: int = 8, group_size: int = 64, **kwargs: Any) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedKVLayer: bits must be 4 or 8, got {bits}")
        self.bits, self.group_size = bits, group_size
        self.parts: dict[str, list[torch.Tensor]] = {}  # "k"/"v" -> [codes, scale, min]
        self.dtype = torch.float32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for states in (key_states, value_states):
            if states.shape[-1] % self.group_size:
                raise ValueError(f"QuantizedKVLayer: head_dim {states.shape[-1]} is not a multiple of "
                                 f"group_size {self.group_size}")
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full = []
        for name, states in (("k", key_states), ("v", value_states)):
            past = self._dequantized(name)
            new = quantize_groups(states, self.bits, self.group_size)
            old = self.parts.get(name)
            self.parts[name] = list(new) if old is None else [torch.cat([o, n], dim=-2) for o, n in zip(old, new)]
            full.append(states if past is None else torch.cat([past, states], dim=-2))
        return full[0], full[1]

    def _dequantized(self, name: str) -> torch.Tensor | None:
        part = self.parts.get(name)
        return None if part is None else dequantize_groups(*part, self.bits, self.group_size, self.dtype)

    @property
    def keys(self) -> torch.Tensor | None:  # dequantized views, for code that reads layer.keys
        return self._dequantized("k")

    @keys.setter
    def keys(self, value: Any) -> None:
        pass  # the base class initializes keys/values to None; storage lives in `parts`

    @property
    def values(self) -> torch.Tensor | None:
        return self._dequantized("v")

    @values.setter
    def values(self, value: Any) -> None:
        pass

    def get_seq_length(self) -> int:
        part = self.parts.get("k")
        return 0 if part is None else part[0].shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def bytes_per_token(self) -> float:
        """Codes + scales + minimums of keys and values, per cached token (0 when empty)."""
        tokens = self.get_seq_length()
        if not tokens:
            return 0.0
        return sum(t.numel() * t.element_size() for part in self.parts.values() for t in part) / tokens

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("QuantizedKVLayer.crop takes a negative count of tokens to remove")
        if tokens_to_remove == 0 or not self.parts:
            return
        keep = self.get_seq_length() + tokens_to_remove
        self.parts = {name: [t[..., :keep, :] for t in part] for name, part in self.parts.items()}

    def reset(self) -> None:
        self.parts = {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.parts = {name: [t.index_select(0, beam_idx.to(t.device)) for t in part] for name, part in self.parts.items()}

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class QuantizedKVCache(Cache):
    """One `QuantizedKVLayer` per decoder layer (full-attention models only)."""

    def __init__(self, num_layers: int, bits: int = 8, group_size: int = 64) -> None:
        super().__init__(layers=[QuantizedKVLayer(bits, group_size) for _ in range(num_layers)])
