"""The `decode-engine` strategy: sessions on the C++ engine, for greedy_decode and for generate().

`EngineDecode` is what the pass sets as the model's `optistack_decode`. It keeps one shared
`EngineRuntime` (kernels/engine_runtime.py) whose cache slots callers take and give back under a lock, so
concurrent generate() calls never share a cache row: each `EngineSession` owns its slots until `close`.
A caller that does not fit the shared runtime while it is busy gets a private one of its own size.

A session's prefill is either the model's own forward (`prefill="model"`: its batched kernels, the exact
mode's reference numerics; the cache is then copied into the engine, left padding skipped) or the engine
itself (`prefill="engine"`: prompts run as rows of the engine, chunked, never through transformers).
Every later token is a row of one engine call: rows of a batch each sit at their own position, so a
left-padded batch decodes each row as it would alone.
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Any

import torch

from ...core.errors import PassApplyError
from ...generation import Generation, cache_kwarg, logits_of, takes_kwarg
from ...generation.sessions import SessionUnavailable

LENGTH_BUCKET = 256  # runtimes (their caches) are sized in multiples of this many positions and reused
SHARED_SLOTS = 4  # slots of the shared runtime: four concurrent single-row callers without a private cache


def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)


def _left_pads(mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Leading zeros of each mask row; refuses a mask that is not left padding (zeros, then ones)."""
    if mask is None:
        return [0] * batch
    if mask.shape != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; the prompt is {batch} x {length}")
    ones = mask.to(torch.long).sum(dim=1)
    pads = (length - ones).tolist()
    for b, pad in enumerate(pads):
        if pad >= length or not bool((mask[b, pad:] != 0).all()):
            raise SessionUnavailable(f"row {b} of attention_mask is not left padding followed by >= 1 real token")
    return [int(p) for p in pads]


class EngineSession:
    """One caller's rows on the engine: slots, each row's filled length and its left padding."""

    def __init__(self, strategy: "EngineDecode", model: Any, batch: int, max_len: int) -> None:
        self.strategy, self.model, self.batch, self.max_len = strategy, model, batch, max_len
        self.runtime, self.slots = strategy.acquire(batch, max_len)
        self.lengths = [0] * batch
        self.pads = [0] * batch
        self.calls = 0  # engine calls made (prefill chunks and steps)
        self._all: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, logit rows) of a step of every row

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = input_ids.shape
        if input_ids.device.type != "cpu":
            raise SessionUnavailable(f"the decode engine runs on the CPU; the prompt is on {input_ids.device}")
        if batch != self.batch:
            raise ValueError(f"this session holds {self.batch} rows; the prompt has {batch}")
        self.pads = _left_pads(attention_mask, batch, length)
        self.lengths = [length - p for p in self.pads]
        if self.strategy.prefill_mode == "engine":
            prompts = [input_ids[b, p:].tolist() for b, p in enumerate(self.pads)]
            self.calls += 1
            return self.runtime.prefill(prompts, self.slots)
        return self._model_prefill(input_ids, attention_mask)

    def _model_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        from transformers import DynamicCache

        target = _unwrap(self.model)
        cache = DynamicCache(config=target.config)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if takes_kwarg(target, "logits_to_keep") else {}
        if any(self.pads):
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = target(input_ids=input_ids, use_cache=True, **{cache_kwarg(target): cache}, **kwargs)
        self.runtime.load_cache(cache, self.slots, self.lengths, self.pads)
        return logits_of(out, last_only=True)[:, -1]

    def extend(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, n, V] after feeding tokens [B, n]; rows not `active` are skipped (their logits are zeros)."""
        batch, n = tokens.shape
        rows = list(range(batch)) if active is None else [b for b in range(batch) if bool(active[b])]
        if not rows:
            return torch.zeros(batch, n, self.runtime.weights.dims.vocab)
        if n == 1 and len(rows) == batch:  # a decode step of every row: no index building beyond the positions
            if self._all is None:
                self._all = (torch.tensor(self.slots, dtype=torch.long), torch.arange(batch))
            logits = self.runtime.forward(tokens.reshape(-1), self._all[0], torch.tensor(self.lengths), self._all[1])
            self.calls += 1
            self.lengths = [length + 1 for length in self.lengths]
            return logits.view(batch, 1, -1)
        tok = tokens[rows].reshape(-1)
        slots = torch.tensor([self.slots[b] for b in rows for _ in range(n)], dtype=torch.long)
        pos = torch.tensor([self.lengths[b] + j for b in rows for j in range(n)], dtype=torch.long)
        logits = self.runtime.forward(tok, slots, pos, torch.arange(len(rows) * n))
        self.calls += 1
        for b in rows:
            self.lengths[b] += n
        if len(rows) == batch:
            return logits.view(batch, n, -1)
        out = torch.zeros(batch, n, logits.shape[-1])
        out[rows] = logits.view(len(rows), n, -1)
        return out

    def rewind(self, length: int) -> None:
        """Keep `length` positions of each row's padded sequence (its own: length minus its padding)."""
        for b, slot in enumerate(self.slots):
            own = length - self.pads[b]
            if not 0 <= own <= self.lengths[b]:
                raise ValueError(f"cannot rewind row {b} to {own} tokens: it holds {self.lengths[b]}")
            self.runtime.rewind(slot, own)
            self.lengths[b] = own

    def close(self) -> None:
        if self.slots:
            self.runtime.release(self.slots)
            self.slots = []

    def __enter__(self) -> "EngineSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a caller that forgot close(): its slots go back all the same
        try:
            self.close()
        except Exception:
            pass


class EngineDecode:
    """The `optistack_decode` strategy: sessions on a shared engine runtime (see the module docstring)."""

    def __init__(self, weights: Any, act_bits: int = 8, prefill: str = "model", kv: str | None = None,
                 panels: bool | None = None) -> None:
        from ...kernels.engine_runtime import KV_TYPES

        if prefill not in ("model", "engine"):
            raise ValueError(f"prefill must be 'model' or 'engine'; got {prefill!r}")
        self.kv_asked = kv  # None: nobody chose (a server then picks its own: serving/engine_backend.py)
        kv = kv or ("float16" if act_bits == 8 else "float32")
        if kv not in KV_TYPES:
            raise ValueError(f"kv must be one of {', '.join(KV_TYPES)} (the KV cache's type); got {kv!r}")
        if panels and act_bits != 8:
            raise ValueError("panels need int8 activations (act_bits=8)")
        self.weights, self.act_bits, self.prefill_mode, self.kv = weights, act_bits, prefill, kv
        self.panels = panels  # the engines' decode rows on int4 panels (None: engine_runtime.default_panels decides)
        self._runtime: Any = None
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> "EngineDecode":  # runtimes (C++ objects) are rebuilt on use
        return EngineDecode(copy.deepcopy(self.weights, memo), self.act_bits, self.prefill_mode, self.kv_asked,
                            self.panels)

    def __getstate__(self) -> dict:
        return {"weights": self.weights, "act_bits": self.act_bits, "prefill_mode": self.prefill_mode, "kv": self.kv,
                "kv_asked": self.kv_asked, "panels": self.panels}

    def __setstate__(self, state: dict) -> None:  # a state from before kv_asked: its kv as if asked
        self.__init__(state["weights"], state["act_bits"], state["prefill_mode"], state.get("kv_asked", state.get("kv")),
                      state.get("panels"))

    def acquire(self, batch: int, length: int) -> tuple[Any, list[int]]:
        """(runtime, slots): `batch` slots of >= `length` positions, from the shared runtime when it fits."""
        if batch < 1 or length < 1:
            raise ValueError(f"an engine session needs >= 1 row and >= 1 position; got {batch} x {length}")
        limit = self.weights.max_positions
        if limit is not None and length > limit:
            raise SessionUnavailable(f"the engine holds up to {self.weights.positions_limit()} positions; this "
                                     f"call needs {length}")
        size = LENGTH_BUCKET * -(-length // LENGTH_BUCKET)
        if limit is not None:
            size = min(size, max(limit, length))
        with self._lock:
            rt = self._runtime
            if rt is not None and rt.length >= length:
                slots = rt.acquire(batch)
                if slots is not None:
                    return rt, slots
            if rt is None or rt.free_slots == rt.slots:  # idle (or none yet): rebuild it big enough
                self._runtime = rt = self.weights.runtime(max(batch, SHARED_SLOTS), max(size, rt.length if rt else 0),
                                                          self.act_bits, kv=self.kv, panels=self.panels)
                return rt, rt.acquire(batch)
        private = self.weights.runtime(batch, size, self.act_bits, kv=self.kv, panels=self.panels)
        return private, private.acquire(batch)

    def open_session(self, model: Any, batch: int, max_len: int) -> EngineSession:
        return EngineSession(self, model, batch, max_len)

    def __call__(self, model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
        """Greedy decoding, timed per call (the workloads' and greedy_decode's path)."""
        if input_ids.device.type != "cpu":
            raise PassApplyError(f"decode-engine: the engine runs on the CPU; the prompt is on {input_ids.device}")
        batch, length = input_ids.shape
        tokens, step_ms = [], []
        with torch.inference_mode(), self.open_session(model, batch, length + max_new_tokens) as session:
            start = time.perf_counter()
            tok = session.prefill(input_ids).max(dim=-1).indices  # argmax's index, ~3x faster than argmax
            step_ms.append((time.perf_counter() - start) * 1000.0)
            tokens.append(tok)
            for _ in range(1, max_new_tokens):
                start = time.perf_counter()
                tok = session.extend(tok[:, None])[:, 0].max(dim=-1).indices
                step_ms.append((time.perf_counter() - start) * 1000.0)
                tokens.append(tok)
            kv = session.runtime.kv_bytes_per_token
        return Generation(torch.stack(tokens, dim=1), step_ms, kv_bytes_per_token=float(kv))

    def agreement(self, model: Any, prompt: torch.Tensor, reference: torch.Tensor) -> tuple[int, int]:
        """(matches, compared): the engine's argmax after each reference token, fed the reference's own
        history, against the reference's next token."""
        with torch.inference_mode(), self.open_session(model, prompt.shape[0], prompt.shape[1] + reference.shape[1]) as s:
            s.prefill(prompt)
            pred = s.extend(reference[:, :-1]).argmax(dim=-1)
        return int((pred == reference[:, 1:]).sum()), reference.shape[0] * (reference.shape[1] - 1)
