"""Continuous batching on the C++ engine: requests join and leave between steps, prompts are chunked.

One worker thread runs the loop. Each step it admits waiting requests into free cache slots (FIFO),
then builds one engine call: a row for every request that is decoding (its last token at its own
position) and, in the token budget left (`step_tokens`), the next chunk of the oldest prompts still being
prefilled. Rows of a slot are adjacent, so a chunk of a prompt and the decode rows of other requests
share one pass over the weights. The logits of each request's row go to its own `TokenChooser`
(sampling.py), its token to its handle; a request that stops, reaches its length or is cancelled gives
its slot back at once. A failed engine call fails the requests in it, never the worker.

Why a budget: a decode row waits for the whole call it is in, so a long prompt chunk raises every running
request's time per output token; `step_tokens` caps it (the server scenario's TPOT limit is 100 ms).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable

import torch

from ..core.hooks import DECODE_ATTR
from .backend import RequestHandle, SamplingParams, ServingError, check_request
from .sampling import TokenChooser, greedy_tokens

DEFAULT_CONTEXT = 2048  # positions per slot unless the caller asks (the KV cache is slots x context)


def server_kv(act_bits: int) -> str:
    """A server's KV cache type where nobody chose one (EngineBackend.from_model says why)."""
    return "int8" if act_bits == 8 else "float32"


@dataclasses.dataclass
class _Running:
    handle: RequestHandle
    slot: int
    chooser: TokenChooser
    fed: int = 0  # prompt tokens already in the cache
    last: int | None = None  # the newest token, fed at the next step

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.handle.prompt_ids)


class EngineBackend:
    """`Backend` on an `EngineRuntime` (kernels/engine_runtime.py); see the module docstring."""

    name = "optistack-engine"

    def __init__(self, runtime: Any, *, step_tokens: int = 128, vocab_size: int | None = None) -> None:
        if step_tokens < 1:
            raise ServingError(f"step_tokens must be >= 1; got {step_tokens}")
        self.runtime = runtime
        self.max_batch = runtime.slots
        self.max_context = runtime.length
        self.name = f"optistack-engine ({runtime.kv} KV cache)"  # what a report or /health says served
        self.step_tokens = step_tokens
        self.vocab_size = vocab_size or runtime.weights.dims.vocab
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[_Running] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # engine calls made
        self.rows = 0  # rows they held

    @classmethod
    def from_model(cls, model: Any, *, max_batch: int = 8, max_context: int | None = None,
                   step_tokens: int = 128, amx_batch: int | None = None, kv: str | None = None,
                   panels: bool | None = None) -> "EngineBackend":
        """The engine the model's `decode-engine` step built, with `max_batch` slots of `max_context` positions.

        `amx_batch`: from this many decode rows in one step, the head runs on AMX int8 tiles (its rows as int8
        instead of int16, so a request's greedy tokens may differ from generate()'s where two logits are close),
        and so do the rows' projections unless they read panels (the same int8 codes, their float sums in another
        order); with it on, decode rows that share a call with a prompt chunk on bf16 tiles join that chunk. The
        default, 5 where the CPU has AMX: where the tiles started to win over the VNNI rows (SmolLM2, 2 cores,
        median of 5 interleaved rounds, 2026-12-06: 4 rows 8.23 ms a step on VNNI against 9.13 on tiles, 5 rows
        10.31 / 9.79, 8 rows 14.6 / 11.0; on panels 8 rows take 7.8 ms, the head on tiles).
        `kv`: the KV cache's type (float16, float32 or int8: about half float16's bytes, twice the slots in
        the same memory); by default the one the decode-engine step was told, else (`kv=auto`) int8 with int8
        activations and float32 in the exact mode (int16: the quantized model's own numbers). Why int8 for a
        server where one stream keeps float16: a server's memory is its slots, and a batch's attention reads
        every row's cache each step (SmolLM2, LoadGen Offline, batch 8 / batch 1 over 8 interleaved rounds on the
        Xeon with AMX: 2.48x float16, 2.61x int8), at a perplexity cost within noise (docs/decoding.md: -0.27%
        over 1,152 teacher-forced tokens); OpenVINO's CPU plugin keeps its KV cache in u8 by default too.
        `panels`: decode rows read the projections' panels of 16 rows (csrc/cpu/int4_panel.h; a second copy
        of the int4 codes); by default as the decode-engine step was told, else with int8 activations whatever
        the model's size when max_batch > 1, on every CPU (SmolLM2, 2 threads, a step of 8 decode rows: Zen 4
        16.6 -> 10.1 ms, the ~1.1B Llama 1.6x; Xeon with AMX 8.6 on int8 tiles -> 7.8 ms), as for one stream
        when it is 1.
        """
        strategy = getattr(model, DECODE_ATTR, None)
        weights = getattr(strategy, "weights", None)
        if weights is None or not hasattr(weights, "runtime"):
            have = type(strategy).__name__ if strategy else "no decode strategy"
            raise ServingError(f"this model has no decode engine ({have}); run the decode-engine pass "
                               "(e.g. the @llm-decode preset) first")
        if max_batch < 1:
            raise ServingError(f"max_batch must be >= 1; got {max_batch}")
        limit = weights.max_positions or DEFAULT_CONTEXT
        context = max_context or min(DEFAULT_CONTEXT, limit)
        if context > limit:
            raise ServingError(f"max_context {context} exceeds {weights.positions_limit()}"
                               if weights.max_positions else
                               f"max_context {context} exceeds the engine's default ({limit})")
        kv = kv or getattr(strategy, "kv_asked", None) or server_kv(strategy.act_bits)
        try:
            runtime = weights.runtime(max_batch, context, strategy.act_bits, max_rows=step_tokens + max_batch,
                                      kv=kv,
                                      panels=cls._panels(panels, strategy, weights, max_batch))
        except ValueError as e:
            raise ServingError(str(e)) from None
        from ..kernels import cpu

        amx = cpu.lib().amx_supported() and strategy.act_bits == 8
        if amx_batch is None:
            amx_batch = 5 if amx else 0
        if amx_batch < 0 or (amx_batch and not amx):
            raise ServingError(f"amx_batch must be >= 0, and 0 where the CPU has no AMX tiles or the engine runs int16 "
                               f"activations; got {amx_batch}")
        runtime.impl.amx_batch = amx_batch
        return cls(runtime, step_tokens=step_tokens)

    @staticmethod
    def _panels(asked: bool | None, strategy: Any, weights: Any, max_batch: int) -> bool:
        """Asked here, else as the decode-engine step was told, else engine_runtime.default_panels: on for batches
        (max_batch > 1) at any size, for one stream as a stream takes them."""
        from ..kernels.engine_runtime import default_panels

        for choice in (asked, getattr(strategy, "panels", None)):
            if choice is not None:
                return bool(choice)
        return default_panels(strategy.act_bits, weights.code_bytes, batches=max_batch > 1)

    # ---------------------------------------------------------------- the Backend contract
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[RequestHandle, int], None] | None = None,
               on_done: Callable[[RequestHandle], None] | None = None) -> RequestHandle:
        check_request(self, prompt_ids, params, self.vocab_size)
        handle = RequestHandle([int(t) for t in prompt_ids], params, request_id, on_token, on_done)
        with self._cond:
            if self._closed:
                raise ServingError("this backend is closed")
            self._waiting.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="optistack-engine-backend", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for h in list(self._waiting):
            h.finish("error", "the backend was closed before this request ran")
        self._waiting.clear()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running), "max_batch": self.max_batch,
                    "steps": self.steps, "rows": self.rows, "kv_cache": self.runtime.kv}

    def __enter__(self) -> "EngineBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- the worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            self._drop_cancelled()
            if self._running:
                self._step()
        for r in self._running:
            self._end(r, "error", "the backend was closed while this request ran")
        self._running.clear()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            handle = self._waiting.popleft()
            if handle.cancelled:
                handle.finish("cancelled")
                continue
            slots = self.runtime.acquire(1)
            if slots is None:
                self._waiting.appendleft(handle)
                return
            chooser = TokenChooser(handle.params, handle.prompt_ids, self.vocab_size)
            self._running.append(_Running(handle, slots[0], chooser))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._running if r.handle.cancelled]:
            self._end(r, "cancelled")

    def _end(self, r: _Running, reason: str, error: str | None = None) -> None:
        if r in self._running:
            self._running.remove(r)
        self.runtime.release([r.slot])
        r.handle.finish(reason, error)

    def _rows(self) -> tuple[list[int], list[int], list[int], list[tuple[int, _Running]]]:
        """One call's rows: every decoding request's token, then prompt chunks within the budget."""
        tokens, slots, positions, wants = [], [], [], []
        for r in self._running:
            if not r.prefilling:
                wants.append((len(tokens), r))
                tokens.append(r.last)
                slots.append(r.slot)
                positions.append(len(r.handle.prompt_ids) + len(r.handle.tokens) - 1)
        budget = max(self.step_tokens - len(tokens), 1)
        for r in self._running:
            if budget <= 0 or not r.prefilling:
                continue
            prompt = r.handle.prompt_ids
            n = min(len(prompt) - r.fed, budget)
            tokens += prompt[r.fed:r.fed + n]
            slots += [r.slot] * n
            positions += range(r.fed, r.fed + n)
            r.fed += n
            budget -= n
            if not r.prefilling:
                wants.append((len(tokens) - 1, r))
        return tokens, slots, positions, wants

    def _greedy(self, logits: torch.Tensor, wants: list[tuple[int, _Running]]) -> dict[int, int]:
        """The tokens of the call's plain-greedy rows, by row, from one `max` (sampling.greedy_tokens); empty where
        fewer than two rows are, or it failed (each row then chooses alone and fails alone)."""
        try:
            greedy = [j for j, (_, r) in enumerate(wants) if r.chooser.plain_greedy(len(r.handle.tokens))]
            return dict(zip(greedy, greedy_tokens(logits, greedy, self.vocab_size))) if len(greedy) > 1 else {}
        except Exception:  # noqa: BLE001 - the per-row path reports the error on each request
            return {}

    def _step(self) -> None:
        tokens, slots, positions, wants = self._rows()
        t = torch.tensor
        try:
            logits = self.runtime.forward(t(tokens, dtype=torch.long), t(slots, dtype=torch.long),
                                          t(positions, dtype=torch.long), t([i for i, _ in wants], dtype=torch.long))
        except Exception as exc:  # the requests in this call fail; the worker keeps serving
            for r in {id(r): r for r in self._running if r.slot in set(slots)}.values():
                self._end(r, "error", f"engine call failed: {type(exc).__name__}: {exc}")
            return
        self.steps += 1
        self.rows += len(tokens)
        now = time.perf_counter()
        picked = self._greedy(logits, wants)
        for j, (_, r) in enumerate(wants):
            h = r.handle
            try:
                token = picked[j] if j in picked else r.chooser.choose(logits[j], len(h.tokens))
            except Exception as exc:
                self._end(r, "error", f"choosing the next token failed: {type(exc).__name__}: {exc}")
                continue
            r.last = token
            h.push(token, now)
            if r.chooser.is_stop(token) and len(h.tokens) >= h.params.min_new_tokens:
                self._end(r, "stop")
            elif len(h.tokens) >= h.params.max_new_tokens:
                self._end(r, "length")
