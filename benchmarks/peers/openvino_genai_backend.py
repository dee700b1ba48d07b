"""OpenVINO GenAI's continuous batching as a serving peer: the `Backend` contract (optistack/serving/backend.py) on
`openvino_genai.ContinuousBatchingPipeline`.

`submit` hands the prompt ids to the pipeline at once (`add_request(id, ov.Tensor(ids), GenerationConfig)`; its
queue is thread-safe) and keeps the `GenerationHandle`. One driver thread calls `pipeline.step()` while requests are
in flight; after each step it reads every handle that has output (`can_read()` / `read()`: the tokens since the
last read), pushes them to the request's `RequestHandle` stamped with the time the step returned (so TTFT and TPOT
are real), and ends the request from `get_status()`. Requests join and leave between steps; the scheduler chunks
prompts into the running batch (`dynamic_split_fuse`) within `max_num_batched_tokens` per step.

What a request may ask, and how it is honoured:

- greedy, or sampling with `temperature`, `top_k` (0: off), `top_p`, `repetition_penalty` (all the pipeline's own,
  per request); `seed` becomes the request's `rng_seed` (the pipeline samples each request from its own generator,
  so one seed gives one sequence whatever runs beside it). An unseeded sampling request gets a fresh random seed:
  the pipeline's default seed is 0 for every request, which would make them all draw alike.
- `max_new_tokens` is the pipeline's. `stop_token_ids` and `min_new_tokens` are applied here, between steps,
  exactly as optistack's engine backend applies them: a listed token at or after `min_new_tokens` tokens ends the
  request ("stop", the token kept) and the pipeline is told to `stop()` it before its next step. The pipeline
  itself ignores EOS (`ignore_eos`): with EOS on it always adds the model's EOS to the stop set, and the contract
  says the model's EOS ends a request only when the caller lists it.
- refused at `submit` with a ServingError naming the field: a negative `seed` (`rng_seed` is unsigned). Every
  other `SamplingParams` value is served.

`step()` holds the GIL for the whole step (measured: a thread sleeping 1 ms wakes only when the step returns), so a
request submitted during a step enters the pipeline when the step ends, which is also when it would be scheduled;
the driver yields the GIL after every step so a waiting submitter gets in before the next one. The KV cache is
sized for `max_batch` requests of `max_context` tokens (`num_kv_blocks`, blocks of `KV_BLOCK_TOKENS`), like the
other backends'. `properties` go to the CPU plugin beside `INFERENCE_NUM_THREADS`; what they leave unset is the
CPU's default, and `describe()` records both. On a CPU with AMX the default inference precision is bf16, and in bf16
the int4 weights are decompressed to bf16; `INFERENCE_PRECISION_HINT=f32` is what turns on OpenVINO's dynamic int8
quantization of activations (`DYNAMIC_QUANTIZATION_GROUP_SIZE`, 32 by default), the int4 x int8 path. The KV cache
is u8 by default (`KV_CACHE_PRECISION`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

from optistack.serving.backend import RequestHandle, SamplingParams, ServingError, check_request

KV_BLOCK_TOKENS = 32  # the pipeline's KV cache block on CPU (its PipelineMetrics.max_cache_usage counts these)
DEFAULT_BATCHED_TOKENS = 128  # tokens per step, decode rows included: optistack's EngineBackend default step_tokens
INSTALL_HINT = "the OpenVINO GenAI peer needs openvino-genai: pip install 'optistack[peers]' (openvino-genai==2026.4.0)"
_REPORTED_DEFAULTS = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
                      "ENABLE_CPU_PINNING", "PERFORMANCE_HINT")


def available() -> tuple[bool, str]:
    """(True, version) when openvino_genai imports here, else (False, why); never raises."""
    if importlib.util.find_spec("openvino_genai") is None:
        return False, INSTALL_HINT
    try:
        import openvino_genai

        return True, str(openvino_genai.get_version())
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason to skip, not a crash
        return False, f"openvino_genai does not import: {type(exc).__name__}: {exc}"


def _require() -> Any:
    ok, why = available()
    if not ok:
        raise ServingError(why)
    import openvino_genai

    return openvino_genai


@dataclasses.dataclass
class _Live:
    handle: RequestHandle
    gen: Any  # openvino_genai.GenerationHandle
    stops: frozenset[int]


class OpenVINOGenAIBackend:
    """`Backend` on `openvino_genai.ContinuousBatchingPipeline` (see the module docstring)."""

    def __init__(self, model_dir: str | Path, *, max_batch: int = 8, max_context: int | None = None, threads: int = 2,
                 max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS, device: str = "CPU",
                 properties: dict[str, Any] | None = None, name: str = "OpenVINO GenAI continuous batching",
                 export: dict[str, Any] | None = None) -> None:
        genai = _require()
        model_dir = Path(model_dir)
        if not (model_dir / "openvino_model.xml").is_file():
            raise ServingError(f"{model_dir} has no openvino_model.xml: give a folder exported by optimum-intel")
        if not (model_dir / "openvino_tokenizer.xml").is_file():
            raise ServingError(f"{model_dir} has no openvino_tokenizer.xml: OpenVINO GenAI needs the converted tokenizer "
                               "(optimum-cli export openvino writes it when openvino-tokenizers is installed)")
        config = _read_json(model_dir / "config.json")
        limit = config.get("max_position_embeddings")

        def need_int(label: str, value: Any, low: int) -> None:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ServingError(f"{label} must be an integer >= {low}; got {value!r}")

        need_int("max_batch", max_batch, 1)
        need_int("threads", threads, 1)
        need_int("max_num_batched_tokens", max_num_batched_tokens, 1)
        if max_context is None:
            max_context = min(limit, 2048) if isinstance(limit, int) else 2048
        need_int("max_context", max_context, 2)
        if isinstance(limit, int) and max_context > limit:
            raise ServingError(f"max_context {max_context} exceeds the model's {limit} positions (max_position_embeddings)")
        self.name, self.model_dir, self.device = name, model_dir, device
        self.max_batch, self.max_context, self.threads = max_batch, max_context, threads
        self.vocab_size = config.get("vocab_size")
        self.export = export or {}
        sched = genai.SchedulerConfig()
        sched.max_num_seqs = max_batch
        sched.max_num_batched_tokens = max_num_batched_tokens
        sched.num_kv_blocks = max_batch * math.ceil(max_context / KV_BLOCK_TOKENS)
        sched.cache_size = 0  # sized by num_kv_blocks
        sched.dynamic_split_fuse = True  # prompt chunks ride along with running decodes, as in the other backends
        sched.enable_prefix_caching = False  # neither of the other backends reuses prefixes
        self.scheduler = {k: getattr(sched, k) for k in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks",
                                                          "cache_size", "dynamic_split_fuse", "enable_prefix_caching")}
        self.scheduler["kv_block_tokens"] = KV_BLOCK_TOKENS
        self.properties = {"INFERENCE_NUM_THREADS": threads, **(properties or {})}
        self._genai = genai
        started = time.perf_counter()
        try:
            self._pipe = genai.ContinuousBatchingPipeline(str(model_dir), sched, device, self.properties)
        except Exception as exc:  # noqa: BLE001 - one line naming what failed
            raise ServingError(f"OpenVINO GenAI could not load {model_dir}: {type(exc).__name__}: {exc}") from exc
        self.load_s = time.perf_counter() - started
        self._status = genai.GenerationStatus
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._seeds = random.Random()  # for unseeded sampling requests (see the module docstring)
        self._cond = threading.Condition()
        self._closed = False
        self._fatal: str | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ the Backend contract
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               on_token: Callable[[RequestHandle, int], None] | None = None,
               on_done: Callable[[RequestHandle], None] | None = None) -> RequestHandle:
        check_request(self, prompt_ids, params, self.vocab_size)
        _check_supported(params)
        import numpy as np
        import openvino as ov

        handle = RequestHandle([int(t) for t in prompt_ids], params, request_id, on_token, on_done)
        config = self._generation_config(params)
        ids = ov.Tensor(np.asarray([handle.prompt_ids], dtype=np.int64))
        with self._cond:
            if self._closed:
                raise ServingError(f"backend {self.name!r} is closed; make a new one")
            if self._fatal is not None:
                raise ServingError(f"backend {self.name!r} failed and takes no requests: {self._fatal}")
            if handle.request_id in self._live:
                raise ServingError(f"request id {handle.request_id!r} is already in flight; give a unique request_id")
            try:
                gen = self._pipe.add_request(next(self._ids), ids, config)
            except Exception as exc:  # noqa: BLE001 - the pipeline's own validation, as one ServingError
                raise ServingError(f"OpenVINO GenAI refused the request: {type(exc).__name__}: {exc}") from exc
            self._live[handle.request_id] = _Live(handle, gen, frozenset(int(t) for t in params.stop_token_ids))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="optistack-openvino-genai")
                self._thread.start()
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Stop a request: the driver drops it from the pipeline before its next step; False if not in flight."""
        with self._cond:
            live = self._live.get(request_id)
        if live is None:
            return False
        live.handle.cancel()
        return True

    def close(self) -> None:
        """End the driver (after the step in progress); requests still in flight fail with "closed"."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=120)
        with self._cond:
            left, self._live = list(self._live.values()), {}
        for live in left:
            try:
                live.gen.cancel()
            except Exception:  # noqa: BLE001 - closing goes on
                pass
            live.handle.finish("error", f"backend {self.name!r} was closed before the request finished")
        if self._thread is None or not self._thread.is_alive():
            if left and self._fatal is None:
                try:  # one more step frees the cancelled requests' blocks (the pipeline frees them at a step's start)
                    self._pipe.step()
                except Exception:  # noqa: BLE001 - closing goes on
                    pass
            self._pipe = None  # frees the compiled model and the KV cache

    def __enter__(self) -> "OpenVINOGenAIBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"in_flight": len(self._live), "steps": self.steps}
        if self._pipe is not None:
            m = self._pipe.get_metrics()
            out.update(pipeline_requests=m.requests, kv_cache_bytes=m.cache_size_in_bytes,
                       max_cache_usage_pct=m.max_cache_usage)
        return out

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        core = ov.Core()
        defaults = {}
        for key in _REPORTED_DEFAULTS:
            if key not in self.properties:
                try:
                    value = core.get_property(self.device, key)
                except Exception:  # noqa: BLE001 - a property this device lacks is left out
                    continue
                defaults[key] = value.to_string() if hasattr(value, "to_string") else getattr(value, "name", str(value))
        return {"name": self.name, "kind": "OpenVINO GenAI ContinuousBatchingPipeline", "model_dir": str(self.model_dir),
                "device": self.device, "max_batch": self.max_batch, "max_context": self.max_context,
                "threads": self.threads, "scheduler": dict(self.scheduler), "properties": dict(self.properties),
                "device_defaults": defaults, "load_s": round(self.load_s, 2), "stats": self.stats(),
                "stops": "stop_token_ids / min_new_tokens applied by the driver; the pipeline runs with ignore_eos",
                "versions": {"openvino": ov.get_version(), "openvino_genai": self._genai.get_version()},
                "export": self.export}

    # ------------------------------------------------------------------ requests
    def _generation_config(self, params: SamplingParams) -> Any:
        config = self._genai.GenerationConfig()
        config.max_new_tokens = params.max_new_tokens
        config.ignore_eos = True  # stops are applied by the driver (module docstring)
        config.repetition_penalty = float(params.repetition_penalty)
        config.do_sample = bool(params.do_sample)
        if params.do_sample:
            config.temperature = float(params.temperature)
            config.top_p = float(params.top_p)
            if params.top_k > 0:
                config.top_k = int(params.top_k)
            config.rng_seed = int(params.seed) if params.seed is not None else self._seeds.getrandbits(32)
        return config

    # ------------------------------------------------------------------ the driver
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._live:
                    self._cond.wait()
                if self._closed:
                    return
                live = list(self._live.values())
            for r in live:
                if r.handle.cancelled:
                    self._drop(r, "cancelled")
            try:
                self._pipe.step()
            except Exception as exc:  # noqa: BLE001 - the pipeline's state is unknown: fail what runs, refuse the rest
                self._fail_all(f"OpenVINO GenAI step failed: {type(exc).__name__}: {exc}")
                return
            now = time.perf_counter()
            self.steps += 1
            with self._cond:
                live = list(self._live.values())
            for r in live:
                try:
                    self._collect(r, now)
                except Exception as exc:  # noqa: BLE001 - a failing callback or read fails its request only
                    self._drop(r, "error", f"reading its output failed: {type(exc).__name__}: {exc}")
            with self._cond:  # under the lock no submit is adding a request meanwhile
                idle = not self._pipe.has_non_finished_requests()
                stranded = [r for r in live if idle and r.handle.request_id in self._live]
            for r in stranded:  # the pipeline holds nothing for them: nothing more will come
                    self._drop(r, "error", f"OpenVINO GenAI ended the request without finishing it "
                                           f"(status {r.gen.get_status()}, {len(r.handle.tokens)} tokens)")
            time.sleep(0)  # step() held the GIL: let a waiting submitter in before the next step

    def _collect(self, r: _Live, now: float) -> None:
        h, gen, status = r.handle, r.gen, self._status
        while gen.can_read():
            for out in gen.read().values():  # one sequence per request (num_return_sequences = 1)
                for token in out.generated_ids:
                    h.push(int(token), now)
                    if int(token) in r.stops and len(h.tokens) >= h.params.min_new_tokens:
                        self._drop(r, "stop")
                        return
                    if len(h.tokens) >= h.params.max_new_tokens:
                        self._end(r, "length")
                        return
        state = gen.get_status()
        if state == status.RUNNING:
            return
        if state == status.FINISHED:  # ignore_eos: only the length ends it, which returned above
            self._end(r, "error", f"OpenVINO GenAI finished the request after {len(h.tokens)} of "
                                  f"{h.params.max_new_tokens} tokens")
        elif state == status.IGNORED:
            self._end(r, "error", f"OpenVINO GenAI ignored the request: its KV cache "
                                  f"({self.scheduler['num_kv_blocks']} blocks) could not hold it")
        else:  # CANCEL / STOP are only ever asked by this driver, which ends the handle when it asks
            self._end(r, "error", f"OpenVINO GenAI ended the request unasked (status {state})")

    def _drop(self, r: _Live, reason: str, error: str | None = None) -> None:
        """End a request the pipeline still holds: free it before the next step, then finish the handle."""
        try:
            if reason == "stop":
                r.gen.stop()
            else:
                r.gen.cancel()
        except Exception:  # noqa: BLE001 - the handle still ends
            pass
        self._end(r, reason, error)

    def _end(self, r: _Live, reason: str, error: str | None = None) -> None:
        with self._cond:
            self._live.pop(r.handle.request_id, None)
        r.handle.finish(reason, error)

    def _fail_all(self, why: str) -> None:
        with self._cond:
            self._fatal = why
            left, self._live = list(self._live.values()), {}
        for r in left:
            r.handle.finish("error", why)


def _check_supported(params: SamplingParams) -> None:
    """Refuse, naming the field, what the pipeline cannot honour per request."""
    if params.do_sample and params.seed is not None and not 0 <= params.seed < 2**64:
        raise ServingError(f"seed={params.seed} is not supported by the OpenVINO GenAI backend: its rng_seed is an "
                           "unsigned 64-bit integer; give 0 <= seed < 2**64 or None")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
