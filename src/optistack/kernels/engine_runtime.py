"""A C++ serving engine with its KV cache and the slots callers take from it.

`EngineRuntime(weights, slots, length)` holds one `LlamaEngine` (csrc/cpu/llama_decode.cpp) and its cache
[L, slots, Hkv, length, D]: float16 for int8 activations (half the bytes attention reads; llama.cpp's
default too), float32 for the exact int16 mode (as the model's own cache), or, asked for with `kv="int8"`,
int8 codes with a float32 scale per position and head (about half float16's bytes: a server holds twice
the requests in the same memory, and long contexts read half as much). Each sequence being decoded
owns a slot: `acquire(n)` hands out free slots under a lock and `release` returns them, so concurrent
callers never share a cache row. `forward(tokens, slots, positions, logit_rows)` runs any rows in one
engine call: decode steps of many sequences, each at its own position, prompt chunks and draft tokens to
verify (rows past the engine's `max_rows` go in several calls). The engine itself serializes calls with a
mutex and sizes its scratch for the threads each call uses.

Threads: a call runs with torch's thread count, one thread fewer while other processes hold its cores
(csrc/cpu/llama_team.h; `adaptive_threads`); `OPTISTACK_ENGINE_THREADS=fixed` in the environment makes every
engine built afterwards use torch's count always (for timings on cores set aside, say).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import torch

KV_TYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


# Panels for a single stream only up to this many bytes of int4 codes: below it a decode row is bound by its
# instructions and panels pay (SmolLM2, 53 MB: 1.32x on a Zen 4), above it by DRAM, where they only cost a second
# copy of the codes (the ~1.1B Llama, 550 MB: 0.98x). A batch of rows is bound by its instructions at any size
# (the 1.1B, 8 rows: 1.60x), so a server takes them whatever the size (serving/engine_backend.py).
PANELS_ALONE_MAX_BYTES = 256 * 2**20


def engine_threads_adaptive() -> bool:
    """`OPTISTACK_ENGINE_THREADS`: `auto` (the default; the team shrinks while held up) or `fixed`."""
    value = os.environ.get("OPTISTACK_ENGINE_THREADS", "auto").strip().lower() or "auto"
    if value not in ("auto", "fixed"):
        raise ValueError(f"OPTISTACK_ENGINE_THREADS must be 'auto' (fewer threads while other processes hold the "
                         f"cores) or 'fixed' (torch's thread count always); got {value!r}")
    return value == "auto"


def default_panels(act_bits: int, code_bytes: int = 0, batches: bool = False) -> bool:
    """Whether engines read int4 panels when not told (csrc/cpu/int4_panel.h), with int8 activations: for batches,
    and for one stream where `code_bytes` of int4 codes are at most PANELS_ALONE_MAX_BYTES, on every CPU (where it
    has AMX tiles too: a SmolLM2 step of 1 row 2.53 -> 2.34 ms, of 8 rows 7.7 on int8 tiles -> 6.3; measured:
    docs/decoding.md)."""
    return act_bits == 8 and (batches or code_bytes <= PANELS_ALONE_MAX_BYTES)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values [..., D] as the engine stores them in an int8 cache: codes and one scale per vector
    (largest magnitude / 127, codes rounded half to even: the bytes the engine itself writes)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127
    codes = torch.round(x / torch.where(scale > 0, scale, 1).unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return codes, scale


class EngineRuntime:
    def __init__(self, weights: Any, slots: int, length: int, act_bits: int = 8, max_rows: int = 512,
                 kv: str | None = None, panels: bool | None = None) -> None:
        from . import cpu

        adaptive = engine_threads_adaptive()  # a bad value is refused before anything is allocated
        if slots < 1 or length < 1:
            raise ValueError(f"an engine needs >= 1 slot and >= 1 position; got {slots} slots of {length}")
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 (int8 activations) or 16 (the exact mode); got {act_bits}")
        kv = kv or ("float16" if act_bits == 8 else "float32")
        if kv not in KV_TYPES:
            raise ValueError(f"kv must be one of {', '.join(KV_TYPES)} (the KV cache's type); got {kv!r}")
        d = weights.dims
        self.weights, self.act_bits, self.length, self.kv = weights, act_bits, length, kv
        cos, sin = weights.rope_tables(length)
        shape = (d.layers, slots, d.kv_heads, length, d.head_dim)
        with torch.inference_mode(False):  # plain tensors, whatever mode the first caller is in: load_cache writes them
            self.k_cache, self.v_cache = torch.zeros(shape, dtype=KV_TYPES[kv]), torch.zeros(shape, dtype=KV_TYPES[kv])
            scales = shape[:-1] if kv == "int8" else (0,)
            self.k_scale, self.v_scale = torch.zeros(scales), torch.zeros(scales)
        if panels is None:
            panels = default_panels(act_bits, weights.code_bytes)
        if panels and act_bits != 8:
            raise ValueError("panels need int8 activations (act_bits=8): the exact mode reads the row layout")
        self.impl = cpu.lib().LlamaEngine(weights.spec(panels), cos, sin, self.k_cache, self.v_cache, self.k_scale,
                                          self.v_scale, act_bits, max_rows)
        self.impl.adaptive_threads = adaptive
        self._lock = threading.Lock()
        self._free = list(range(slots))

    # ---------------------------------------------------------------- threads
    @property
    def adaptive_threads(self) -> bool:
        """Whether a call may run with fewer threads than torch allows while others hold the cores."""
        return bool(self.impl.adaptive_threads)

    @adaptive_threads.setter
    def adaptive_threads(self, on: bool) -> None:
        self.impl.adaptive_threads = bool(on)

    @property
    def team_threads(self) -> int:
        """The threads the next call would use (fewer than torch's count while the team is held up)."""
        return int(self.impl.team_threads)

    # ---------------------------------------------------------------- slots
    @property
    def slots(self) -> int:
        return int(self.impl.slots)

    @property
    def max_rows(self) -> int:
        return int(self.impl.max_rows)

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one position of one slot takes (keys and values of every layer, with an int8 cache's scales)."""
        d = self.weights.dims
        per_head = d.head_dim * self.k_cache.element_size() + (4 if self.kv == "int8" else 0)
        return d.layers * 2 * d.kv_heads * per_head

    def acquire(self, n: int = 1) -> list[int] | None:
        """`n` free slots (emptied), or None when fewer are free."""
        with self._lock:
            if n > len(self._free):
                return None
            taken, self._free = self._free[:n], self._free[n:]
        for s in taken:
            self.impl.set_length(s, 0)
        return taken

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:  # emptied before it is free: once free, another caller may own it at once
            for s in slots:
                if not 0 <= s < self.slots or s in self._free:
                    raise ValueError(f"slot {s} is not in use in this engine (slots 0..{self.slots - 1})")
            for s in slots:
                self.impl.set_length(s, 0)
                self._free.append(s)

    def filled(self, slot: int) -> int:
        return int(self.impl.length(slot))

    def rewind(self, slot: int, length: int) -> None:
        """Forget the slot's positions from `length` on (rejected draft tokens)."""
        if not 0 <= length <= self.filled(slot):
            raise ValueError(f"cannot rewind slot {slot} to {length} positions: it holds {self.filled(slot)}")
        self.impl.set_length(slot, length)

    # ---------------------------------------------------------------- running rows
    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits [len(logit_rows), V] after running every row (token at position of slot) in order."""
        n = tokens.numel()
        if n <= self.max_rows:
            return self.impl.forward(tokens, slots, positions, logit_rows)
        want = logit_rows.tolist()
        out = torch.empty(len(want), self.weights.dims.vocab)
        for start in range(0, n, self.max_rows):
            stop = min(n, start + self.max_rows)
            mine = [(i, r) for i, r in enumerate(want) if start <= r < stop]
            rows = torch.tensor([r - start for _, r in mine], dtype=torch.long)
            got = self.impl.forward(tokens[start:stop], slots[start:stop], positions[start:stop], rows)
            for j, (i, _) in enumerate(mine):
                out[i] = got[j]
        return out

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int], chunk: int | None = None) -> torch.Tensor:
        """Each prompt into its (empty) slot by the engine itself, `chunk` rows a call; logits [B, V] of
        each prompt's last token."""
        chunk = chunk or self.max_rows
        rows = [(b, p) for b, ids in enumerate(prompts) for p in range(len(ids))]
        if not rows or any(len(ids) == 0 for ids in prompts):
            raise ValueError("every prompt needs at least one token")
        out = torch.empty(len(prompts), self.weights.dims.vocab)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            tokens = torch.tensor([prompts[b][p] for b, p in part], dtype=torch.long)
            slot_t = torch.tensor([slots[b] for b, _ in part], dtype=torch.long)
            pos_t = torch.tensor([p for _, p in part], dtype=torch.long)
            last = [i for i, (b, p) in enumerate(part) if p == len(prompts[b]) - 1]
            got = self.impl.forward(tokens, slot_t, pos_t, torch.tensor(last, dtype=torch.long))
            for j, i in enumerate(last):
                out[part[i][0]] = got[j]
        return out

    def load_cache(self, cache: Any, slots: Sequence[int], lengths: Sequence[int], offsets: Sequence[int] | None = None) -> None:
        """Copy a transformers cache (after the model's own prefill) into the engine: row b's positions
        offsets[b] .. offsets[b] + lengths[b] (left padding skipped) become positions 0.. of slots[b]."""
        offsets = offsets if offsets is not None else [0] * len(slots)
        with torch.no_grad():
            self._copy_cache(cache, slots, lengths, offsets)
        for slot, n in zip(slots, lengths):
            self.impl.set_length(slot, n)

    def _copy_cache(self, cache: Any, slots: Sequence[int], lengths: Sequence[int], offsets: Sequence[int]) -> None:
        for i, layer in enumerate(cache.layers):
            for b, (slot, n, off) in enumerate(zip(slots, lengths, offsets)):
                if n > self.length:
                    raise ValueError(f"a prompt of {n} tokens does not fit this engine's {self.length} positions")
                keys, values = layer.keys[b, :, off:off + n], layer.values[b, :, off:off + n]
                if self.kv == "int8":
                    (kq, ks), (vq, vs) = quantize_kv(keys), quantize_kv(values)
                    self.k_cache[i, slot, :, :n].copy_(kq)
                    self.v_cache[i, slot, :, :n].copy_(vq)
                    self.k_scale[i, slot, :, :n].copy_(ks)
                    self.v_scale[i, slot, :, :n].copy_(vs)
                else:
                    self.k_cache[i, slot, :, :n].copy_(keys)
                    self.v_cache[i, slot, :, :n].copy_(values)
