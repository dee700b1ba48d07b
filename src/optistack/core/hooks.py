"""The model-side hooks: attributes a pass puts on a model (or a workload declares) that another layer reads.

optistack's layers talk through the model they hand each other. A pass cannot call the workload or the
saver, so it leaves a declared attribute on the model, and the reader looks for that attribute by the
name here. Every writer and reader imports the constant (or checks the Protocol) from this module
instead of spelling the string, so a rename is one edit and `grep HOOK_NAME` finds every party.

Hook (set by -> read by):
- `optistack_spec()` / `from_optistack_spec(spec)` (replacement layers: Int4Linear, Fp8Linear, the fused
  kernels -> `core.persist` on save, `core.load_registry` on load);
- `save_to(folder)` / `session_options()` / `load_from(...)` / `model_bytes()` (runtime forms: ONNX
  Runtime, OpenVINO, TensorRT models -> `core.persist`, `core.loading`, `bench.memory`);
- `optistack_cache` (`kv-cache` -> `generation.new_cache` / `greedy_decode`, `speculative`);
- `optistack_decode` (`speculative`, `decode-engine` -> `generation.greedy_decode`, and generate() through
  the strategy's `open_session`);
- `generate` (`speculative`, `kv-cache`, `decode-engine` via `generation.install_generate` -> users and
  transformers pipelines calling `model.generate`): transformers' generate() with our decoding loop. Not in
  HOOKS: it is transformers' public name, which other code reads as such;
- `optistack_prepare_context()` / `optistack_prepare_ms()` (`prompt-compress`'s wrapper model -> the
  long-QA workload);
- `rewrites_prompts`, on the workload (the long-QA workload -> `prompt-compress`, which notes when
  prompts would reach the model unchanged).

Attribute reads pass through torch.compile wrappers, so hooks set before a `compile` survive it. The
Protocols only say what a hook promises; nothing needs to inherit them. This module imports nothing
heavy: `import optistack` stays lean.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

# ---------------------------------------------------------------- saving and loading
SPEC_ATTR = "optistack_spec"  # method on a replacement layer: the JSON spec it is rebuilt from
FROM_SPEC_ATTR = "from_optistack_spec"  # classmethod: the empty layer rebuilt from that spec
SAVE_TO_ATTR = "save_to"  # method on a runtime form: write its file(s) into a folder
SESSION_OPTIONS_ATTR = "session_options"  # method on a runtime form: the options it is reloaded with
LOAD_FROM_ATTR = "load_from"  # classmethod on a runtime form: rebuild it from what save_to wrote
MODEL_BYTES_ATTR = "model_bytes"  # method on a runtime form (not a torch module): its size in bytes

# ---------------------------------------------------------------- decoding (causal LMs)
CACHE_ATTR = "optistack_cache"  # a cache factory set on the model by a pass (kv-cache)
DECODE_ATTR = "optistack_decode"  # a decode strategy set on the model by a pass (speculative)

# ---------------------------------------------------------------- prompt rewriting (serving)
PREPARE_CONTEXT_ATTR = "optistack_prepare_context"  # method: rewrite a prompt's document before tokenizing
PREPARE_MS_ATTR = "optistack_prepare_ms"  # method: median ms one rewrite cost, None before the first
REWRITES_PROMPTS_ATTR = "rewrites_prompts"  # workload attribute: True when it calls optistack_prepare_context

HOOKS = (SPEC_ATTR, FROM_SPEC_ATTR, SAVE_TO_ATTR, SESSION_OPTIONS_ATTR, LOAD_FROM_ATTR, MODEL_BYTES_ATTR,
         CACHE_ATTR, DECODE_ATTR, PREPARE_CONTEXT_ATTR, PREPARE_MS_ATTR, REWRITES_PROMPTS_ATTR)


@runtime_checkable
class SavableLayer(Protocol):
    """A replacement layer `optistack.load` can rebuild: `optistack_spec()` is JSON (checked against the
    class's schema in `core.load_registry` on save and load), `from_optistack_spec(spec)` builds the
    empty layer whose tensors the saved state dict then fills. Called by `core.persist` (save) and
    `core.load_registry` (load); the class registers itself with `load_registry.register_module`."""

    def optistack_spec(self) -> dict[str, Any]: ...

    @classmethod
    def from_optistack_spec(cls, spec: dict[str, Any]) -> Any: ...


@runtime_checkable
class SavableRuntime(Protocol):
    """A runtime form (ONNX Runtime session, OpenVINO or TensorRT model) that saves itself.

    `save_to(folder)` writes its file(s) and returns their names (main file first); `session_options()`
    is the JSON the folder records; `load_from(folder, file, options)` rebuilds it from both, taking only
    the keys `session_options` writes. `model_bytes()` is its size (the benchmark reports it, since a
    runtime form has no torch parameters to count). Called by `core.persist`, `core.loading` and
    `bench.memory`; the class registers itself with `load_registry.register_runtime`."""

    def save_to(self, folder: str) -> str | list[str]: ...

    def session_options(self) -> dict[str, Any]: ...

    @classmethod
    def load_from(cls, folder: str, file: str, options: dict[str, Any]) -> Any: ...

    def model_bytes(self) -> int: ...


@runtime_checkable
class CacheFactory(Protocol):
    """`model.optistack_cache`, set by `kv-cache`: `factory(model, max_len)` returns the transformers Cache
    for a prompt plus new tokens of `max_len` in all. Optional attributes: `bytes_per_token(model)`,
    `eager_prefill = True` to have the prefill run by the module under a torch.compile wrapper (only the
    fixed-shape decode step is compiled), and `acquire(model, max_len)` / `release(cache)` for a factory
    that reuses its caches: a cache is then lent to one caller at a time (`generation.lease_cache`), so
    concurrent generate() calls never share one. Read by `generation.new_cache` and every decode strategy."""

    def __call__(self, model: Any, max_len: int) -> Any: ...


@runtime_checkable
class DecodeStrategy(Protocol):
    """`model.optistack_decode`, set by `speculative` and `decode-engine`.

    `strategy(model, input_ids, max_new_tokens)` returns a `generation.Generation` with the greedy tokens
    (exactly plain greedy decoding's for a lossless strategy). Called by `generation.greedy_decode` with
    the very callable it was given (a compiled wrapper, if any).

    `open_session(model, batch, max_len)` (optional, but what makes generate() fast) returns a
    `generation.sessions.DecodeSession` for one generate() call of `batch` rows and at most `max_len`
    positions (prompt with padding + new tokens): prefill / extend / rewind / close. generate() keeps
    sampling, logits processors and stopping criteria, the session only runs the model. A strategy
    without it is served by `generation.ModelSession` (the model's own forward). A session that cannot
    serve a request (another device, a size it cannot hold) raises `generation.SessionUnavailable` from
    `open_session` or `prefill`; a strategy may also declare `device_types = ("cpu",)`. generate() then
    runs transformers' own loop with one warning."""

    def __call__(self, model: Any, input_ids: Any, max_new_tokens: int) -> Any: ...


@runtime_checkable
class PromptRewriter(Protocol):
    """A model that rewrites a prompt's document before it is tokenized (`prompt-compress`'s wrapper).

    `optistack_prepare_context(context, question, rest)` returns the document to put in the prompt
    (the question and the rest of the prompt are used to size and score it, never changed);
    `optistack_prepare_ms()` the median ms one rewrite cost, None before the first. Called by a
    workload that declares `rewrites_prompts = True` (the long-QA workload)."""

    def optistack_prepare_context(self, context: str, question: str, rest: str = "") -> str: ...

    def optistack_prepare_ms(self) -> float | None: ...


def rewrites_prompts(workload: Any) -> bool:
    """Whether `workload` calls `optistack_prepare_context` on the model (its `rewrites_prompts` flag)."""
    return bool(getattr(workload, REWRITES_PROMPTS_ATTR, False))
