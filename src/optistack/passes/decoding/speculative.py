"""`speculative`: speculative greedy decoding, token-identical to plain greedy decoding.

Each decode step proposes up to `num_draft_tokens` next tokens cheaply, then the target model scores
the last accepted token plus all proposals in ONE forward pass with the KV cache. The longest prefix of
proposals equal to the target's own argmax is accepted, plus the target's next token; the cache entries
of rejected proposals are dropped (`Cache.crop`). A step therefore yields 1..k+1 tokens for the price of
one target forward over k+1 positions, which on a memory-bound decode costs little more than one token.

- `method=prompt-lookup` (default): proposals come from the latest earlier occurrence of the last
  n-gram (`max_ngram` down to `min_ngram` tokens) in the prompt + generated text. No draft model;
  pays off when answers copy spans of the context (long-context QA, summarization, code edits).
- `method=draft`: a smaller model with the same vocabulary proposes greedily: a local Hugging Face
  folder (`draft=/path`), or, without one, a layer-skipping draft built from the target's first
  `draft_layers` layers and its own head (weights shared, no extra memory).

The pass sets the decode strategy (`optistack_decode`, see `core/hooks.py` and `generation/`), then checks
that strategy against plain greedy decoding on `check_prompts` prompts of `check_tokens` new tokens
and refuses (the step fails, the model before it is kept) on the first differing token. After
`decode-engine` the drafts are verified on the engine: the fed token and its drafts are rows of one slot
in one engine call (one pass over the weights for up to 31 tokens, each row computed exactly as a decode
step would compute it), and the check compares with the engine's own greedy decoding. Batch size 1
only in greedy_decode: larger batches decode plainly. The pass also installs the model's `generate`
(`generation.install_generate`): greedy batch-1 calls verify drafts on a `SpeculativeSession`, sampling
and batches decode one token a step on it.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Literal, Optional

import torch

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.hooks import CACHE_ATTR, DECODE_ATTR
from ...core.load_registry import register_reapply
from ...core.modeling import unwrap_compiled
from ...core.pass_protocol import COMPILED, MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, need_packages
from ...generation import (
    Generation,
    ModelSession,
    cache_bytes_per_token,
    greedy_decode,
    install_generate,
    uninstall_generate,
)
from .common import check_prompts, require_causal_lm, verify_identical
from .engine_strategy import EngineDecode
from .lookup import DraftModel, PromptLookup

ENGINE_MAX_K = 30  # drafts a step verifies on the engine (with the fed token: fewer rows than its amx_rows, 32)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig(PassConfig):
    method: Literal["prompt-lookup", "draft"] = "prompt-lookup"
    # 16 / 2 measured best on smollm2-qa (1.41x tokens/s vs 1.26x with 8 / 1): answers copied from the
    # context accept long drafts, and one-token matches mostly propose wrong continuations
    num_draft_tokens: int = 16
    max_ngram: int = 3
    min_ngram: int = 2
    draft: Optional[str] = None
    draft_layers: int = 0
    check_prompts: int = 2
    check_tokens: int = 32

    def __post_init__(self) -> None:
        check(1 <= self.num_draft_tokens <= 64,
              f"speculative: option 'num_draft_tokens' must be 1..64; got {self.num_draft_tokens}")
        check(1 <= self.min_ngram <= self.max_ngram,
              f"speculative: options need 1 <= min_ngram <= max_ngram; "
              f"got min_ngram={self.min_ngram}, max_ngram={self.max_ngram}")
        check(self.draft_layers >= 0,
              f"speculative: option 'draft_layers' must be >= 0 (0: a third of the target's); got {self.draft_layers}")
        check(self.method == "draft" or (self.draft is None and self.draft_layers == 0),
              "speculative: options 'draft' and 'draft_layers' need method=draft")
        check(self.check_prompts >= 1,
              f"speculative: option 'check_prompts' must be >= 1 (output identity is always checked); "
              f"got {self.check_prompts}")
        check(self.check_tokens >= 2, f"speculative: option 'check_tokens' must be >= 2; got {self.check_tokens}")


class SpeculativeDecoder:
    """The decode strategy: `decoder(model, input_ids, max_new_tokens) -> Generation` (greedy_decode's
    path), and `open_session(model, batch, max_len)` for generate(): a `SpeculativeSession`."""

    def __init__(self, proposer: Any, num_draft_tokens: int, base: Any = None) -> None:
        # base: the decode-engine strategy the drafts are verified on (None: the model's own forward)
        self.proposer, self.k, self.base = proposer, num_draft_tokens, base

    def open_session(self, model: Any, batch: int, max_len: int) -> "SpeculativeSession":
        inner = self.base.open_session(model, batch, max_len) if self.base else ModelSession(model, batch, max_len)
        return SpeculativeSession(inner, copy.copy(self.proposer), self.k)

    def __call__(self, model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
        if input_ids.shape[0] != 1:
            return greedy_decode(model, input_ids, max_new_tokens, use_strategy=False)
        sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
        step_ms: list[float] = []
        counts: list[int] = []
        session = self.open_session(model, 1, input_ids.shape[-1] + max_new_tokens + self.k)
        try:
            with torch.inference_mode():
                sync()
                start = time.perf_counter()
                seq = torch.cat([input_ids[0], session.prefill(input_ids).argmax(dim=-1)])
                sync()
                step_ms.append((time.perf_counter() - start) * 1000.0)
                counts.append(1)
                while len(seq) - input_ids.shape[-1] < max_new_tokens:
                    session.accepted(seq.numel())
                    sync()
                    start = time.perf_counter()
                    made = seq.numel() - input_ids.shape[-1]
                    drafts = session.propose(seq, min(self.k, max_new_tokens - made - 1))
                    feed = torch.tensor([[int(seq[-1])] + drafts], dtype=seq.dtype, device=seq.device)
                    best = session.extend(feed)[0].argmax(dim=-1)  # the target's choice after each fed token
                    n = _matching_prefix(drafts, best)
                    if len(drafts) > n:  # drop the rejected proposals' cache entries
                        session.rewind(seq.numel() + n)
                    seq = torch.cat([seq, best[: n + 1].to(seq.dtype)])
                    sync()
                    step_ms.append((time.perf_counter() - start) * 1000.0)
                    counts.append(n + 1)
            kv = session.kv_bytes_per_token()
        finally:
            session.close()
        tokens = seq[input_ids.shape[-1] :].view(1, -1)
        return Generation(tokens, step_ms, tokens_per_step=counts, kv_bytes_per_token=kv)

    def __deepcopy__(self, memo: dict) -> "SpeculativeDecoder":
        new = SpeculativeDecoder(copy.deepcopy(self.proposer, memo), self.k, copy.deepcopy(self.base, memo))
        if isinstance(new.proposer, DraftModel):
            new.proposer.cache = None
        return new


class SpeculativeSession:
    """A `ModelSession` (or a decode-engine session: drafts verified as rows of one engine call) plus this
    session's own proposer (a shallow copy of the strategy's: a draft model's weights are shared, its cache
    is not), for generate()'s speculative loop (`generation/hf_loop.py`)."""

    def __init__(self, inner: Any, proposer: Any, num_draft_tokens: int) -> None:
        self.inner, self.proposer, self.num_draft_tokens = inner, proposer, num_draft_tokens
        self.batch = inner.batch

    @property
    def cache(self) -> Any:
        return getattr(self.inner, "cache", None)

    def kv_bytes_per_token(self) -> float | None:
        runtime = getattr(self.inner, "runtime", None)
        return float(runtime.kv_bytes_per_token) if runtime is not None else cache_bytes_per_token(self.cache)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.proposer.reset(self.inner.model, input_ids)
        return self.inner.prefill(input_ids, attention_mask)

    def extend(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.extend(tokens, active)

    def rewind(self, length: int) -> None:
        self.inner.rewind(length)

    def close(self) -> None:
        self.inner.close()
        if isinstance(self.proposer, DraftModel):
            self.proposer.cache = None

    def propose(self, seq: torch.Tensor, k: int) -> list[int]:
        """Up to `k` next tokens for the 1-D sequence so far (prompt + accepted tokens)."""
        return self.proposer.propose(seq, k) if k > 0 else []

    def accepted(self, seq_len: int) -> None:
        """The sequence now has `seq_len` tokens (the proposer forgets proposals beyond them)."""
        self.proposer.accepted(seq_len)


def _matching_prefix(drafts: list[int], best: torch.Tensor) -> int:
    """How many leading proposals equal the target's argmax at the same position."""
    n = 0
    for i, token in enumerate(drafts):
        if int(best[i]) != token:
            break
        n += 1
    return n


def layer_skip_draft(model: Any, layers: int) -> Any:
    """The target's first `layers` decoder layers, final norm and head, sharing the target's weights."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise PassApplyError(f"speculative: draft_layers needs a model with `.model.layers` (Llama-style); "
                             f"{type(model).__name__} has none; give a draft path instead")
    if not 1 <= layers < len(blocks):
        raise PassApplyError(f"speculative: option 'draft_layers' must be 1..{len(blocks) - 1} for this "
                             f"{len(blocks)}-layer model; got {layers}")
    draft, draft_inner = copy.copy(model), copy.copy(inner)
    for attr in (DECODE_ATTR, CACHE_ATTR):
        draft.__dict__.pop(attr, None)
    uninstall_generate(draft)  # a generate() installed on the target serves the target, not its draft
    draft._modules = dict(model._modules)
    draft_inner._modules = dict(inner._modules)
    draft_inner.layers = torch.nn.ModuleList(list(blocks)[:layers])
    draft.model = draft_inner
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    draft.config = draft_inner.config = config
    return draft


def load_draft(path: str, model: Any) -> Any:
    """A local Hugging Face causal LM whose vocabulary matches the target's, on the target's device/dtype."""
    from transformers import AutoModelForCausalLM

    try:
        draft = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise PassApplyError(f"speculative: cannot load the draft model from {path!r} (a local Hugging Face "
                             f"folder is expected): {type(exc).__name__}: {exc}") from exc
    want, got = model.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    if want != got:
        raise PassApplyError(f"speculative: the draft's vocabulary ({got} tokens) differs from the target's "
                             f"({want}); draft and target must share a tokenizer")
    param = next(model.parameters())
    return draft.to(device=param.device, dtype=param.dtype).eval()


class SpeculativePass(ConfiguredPass):
    """Sets a speculative decode strategy on the model after checking it is token-identical."""

    name = "speculative"
    Config = SpeculativeConfig
    takes = frozenset({MODULE, COMPILED})
    reapply_on_load = True  # the strategy is an attribute, not a tensor

    def requirements(self) -> Availability:
        return need_packages("transformers", extra="hf")  # its caches and decode loop are transformers'

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        cfg = self.config
        require_causal_lm(self.name, ctx, model)
        base = getattr(model, DECODE_ATTR, None)
        if base is not None and not isinstance(base, EngineDecode):
            raise PassApplyError(f"speculative: the model already has a decode strategy ({type(base).__name__}); "
                                 "speculative verifies on the model itself or on decode-engine, not on another strategy")
        k = cfg.num_draft_tokens
        if base is not None:  # drafts verified on the engine: rows of one slot past ENGINE_MAX_K + 1 would take
            k = min(k, ENGINE_MAX_K)  # the AMX-bf16 prompt path (other numerics than a decode step)
        info: dict[str, Any] = {"method": cfg.method, "num_draft_tokens": k,
                                "verifies_on": "decode-engine" if base is not None else "model"}
        if cfg.method == "prompt-lookup":
            proposer: Any = PromptLookup(cfg.max_ngram, cfg.min_ngram)
        else:
            target = unwrap_compiled(model)
            if cfg.draft is not None:
                draft = load_draft(cfg.draft, target)
            else:
                layers = cfg.draft_layers or max(1, target.config.num_hidden_layers // 3)
                draft = layer_skip_draft(target, layers)
            info["draft_layers"] = int(draft.config.num_hidden_layers)
            info["draft_params"] = sum(p.numel() for p in draft.parameters())
            proposer = DraftModel(draft)
        object.__setattr__(model, DECODE_ATTR, SpeculativeDecoder(proposer, k, base))
        try:
            prompts = check_prompts(ctx, cfg.check_prompts, model.config.get_text_config().vocab_size)
            info["checked_tokens"] = verify_identical(self.name, model, prompts, cfg.check_tokens, reference=base)
        except Exception:
            if base is None:
                object.__delattr__(model, DECODE_ATTR)
            else:
                object.__setattr__(model, DECODE_ATTR, base)
            raise
        install_generate(model)  # the user's generate() speculates too (generation/hf_generate.py)
        return PassResult(model, modified=True, info=info)


def _no_draft(v: Any) -> str | None:
    return None if v is None else ("a draft model path is not followed from a saved folder; "
                                   "apply speculative{draft=...} after loading")


register_reapply(SpeculativePass, {"draft": _no_draft})
