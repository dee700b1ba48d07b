"""`prompt-compress`: shorten the document in a prompt with LLMLingua before the model sees it.

A small causal LM (the scorer: the bundled SmolLM2 by default, `model=/local/folder` otherwise)
rates each sentence or token; the least useful are dropped until the whole prompt is `rate` times its
length (only the document shrinks), or the document is `target_tokens` long (scorer tokens).
`level=sentence` drops whole sentences, `level=token` drops tokens (LLMLingua). `question_aware`
ranks by how much each part makes the question likely (LongLLMLingua).
`method=llmlingua2` uses a token-classification checkpoint instead of a causal LM (LLMLingua-2); it
needs a local checkpoint folder in `model=`, since nothing is downloaded.

The weights do not change: the pass returns the model inside a `CompressedPromptModel`, which the
workload asks to rewrite the document (`optistack_prepare_context`, see core/hooks.py). Only the
document is compressed; the instruction and the question are added afterwards, intact. Compression
runs once per distinct (document, question) and is cached, as a server would cache the compressed
form of a document it retrieves often; its cost is reported as `prompt_prepare_ms`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
import types
from pathlib import Path
from typing import Any, Literal

import torch

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.hooks import rewrites_prompts
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.quiet import quiet_import
from ...core.requirements import Availability
from ...generation import cache_kwarg
from .offline import offline_available, offline_llmlingua


@dataclasses.dataclass(frozen=True)
class PromptCompressConfig(PassConfig):
    rate: float = 0.5
    target_tokens: int = 0  # > 0: compress the document to this many (scorer) tokens instead of `rate`
    level: Literal["sentence", "token"] = "sentence"
    method: Literal["llmlingua", "llmlingua2"] = "llmlingua"
    model: str = ""  # local folder: the scorer LM (llmlingua) or the LLMLingua-2 checkpoint; "" = SmolLM2
    question_aware: bool = True  # LongLLMLingua: keep what helps predict the question (it is never compressed)
    keep_digits: bool = True  # llmlingua2 only: never drop tokens with digits (numbers are often the answer)

    def __post_init__(self) -> None:
        check(0.0 < self.rate <= 1.0, f"prompt-compress: option 'rate' must be in (0, 1]; got {self.rate}")
        check(self.target_tokens >= 0, f"prompt-compress: option 'target_tokens' must be >= 0; got {self.target_tokens}")
        check(self.method != "llmlingua2" or self.level == "token",
              "prompt-compress: method=llmlingua2 classifies tokens; it takes level=token only")


def checkpoint_problem(path: str, want_token_classifier: bool) -> str | None:
    """Why `path` is not a usable local checkpoint folder, or None when it is."""
    folder = Path(path).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return f"{folder} is not a local model folder (no config.json); nothing is downloaded"
    except (OSError, ValueError) as exc:
        return f"cannot read {folder / 'config.json'}: {exc}"
    classifier = any("ForTokenClassification" in a for a in config.get("architectures") or [])
    if want_token_classifier and not classifier:
        return f"{folder} is not a token-classification checkpoint (LLMLingua-2 needs one)"
    if not want_token_classifier and classifier:
        return f"{folder} is a token-classification checkpoint; use method=llmlingua2 for it"
    return None


class LegacyCacheLM(torch.nn.Module):
    """The scorer as llmlingua 0.2 calls it: KV caches as lists of (key, value) per layer.

    transformers 5 models take and return `Cache` objects; this converts both ways, so llmlingua's
    iterative compression (which trims the cache it gets back) runs unchanged.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, past_key_values: Any = None,
                use_cache: bool = True, **kwargs: Any) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v, *_ in past_key_values]) if past_key_values else DynamicCache()
        kwargs[cache_kwarg(self.model)] = cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        return types.SimpleNamespace(logits=out.logits, past_key_values=[(layer.keys, layer.values) for layer in cache.layers])


class LinguaCompressor:
    """llmlingua's PromptCompressor, built and called offline (see offline.py)."""

    def __init__(self, config: PromptCompressConfig, model_dir: str) -> None:
        self.config = config
        with offline_llmlingua() as pc, quiet_import(hf_progress=True):
            self._impl = pc.PromptCompressor(model_name=model_dir, device_map="cpu",
                                             model_config={"trust_remote_code": False},
                                             use_llmlingua2=config.method == "llmlingua2")
        if config.method == "llmlingua":
            self._impl.model = LegacyCacheLM(self._impl.model)

    def compress(self, context: str, question: str, rest: str = "") -> str:
        """`context` shortened to `target_tokens`, or so that with `rest` (the parts of the prompt that
        stay as they are) the whole prompt is `rate` times as long: llmlingua's meaning of rate."""
        cfg = self.config
        if cfg.target_tokens:
            return self._compress_to(context, question, float(cfg.target_tokens))
        # `rate` is a ceiling: the sentence filter keeps the sentence that crosses the budget, so a
        # result over it is compressed again with the budget scaled down by the overshoot (twice at most).
        kept = self._impl.get_token_length(rest) if rest else 0
        whole = self._impl.get_token_length(context) + kept
        goal = max(cfg.rate * whole - kept, 1.0)
        budget, out = goal, context
        for _ in range(3):
            out = self._compress_to(context, question, budget)
            got = self._impl.get_token_length(out)
            if got <= goal:
                break
            budget = max(budget * goal / got, 1.0)
        return out

    def _compress_to(self, context: str, question: str, target_tokens: float) -> str:
        cfg = self.config
        target = {"target_token": target_tokens}
        with offline_llmlingua(), torch.inference_mode():
            if cfg.method == "llmlingua2":
                out = self._impl.compress_prompt_llmlingua2([context], force_reserve_digit=cfg.keep_digits,
                                                            use_context_level_filter=False, **target)
            else:
                aware = {"rank_method": "longllmlingua", "condition_in_question": "after"} if cfg.question_aware else {}
                if cfg.question_aware and cfg.level == "token":
                    aware["condition_compare"] = True  # LongLLMLingua's contrastive perplexity
                out = self._impl.compress_prompt(
                    [context], instruction="", question=question if cfg.question_aware else "",
                    concate_question=False, use_context_level_filter=False,
                    use_sentence_level_filter=cfg.level == "sentence", use_token_level_filter=cfg.level == "token",
                    token_budget_ratio=1.0, **aware, **target)
        return out["compressed_prompt"].strip()


class CompressedPromptModel(torch.nn.Module):
    """The model, called exactly as before, plus `optistack_prepare_context` for the workload
    (a `core.hooks.PromptRewriter`).

    `forward` delegates to the wrapped model (so perplexity, timing and generation work unchanged);
    other attributes (`config`, `device`, `generate`) are looked up on the wrapped model too.
    """

    def __init__(self, model: torch.nn.Module, compressor: LinguaCompressor) -> None:
        super().__init__()
        self.model = model
        self.compressor = compressor
        self._compressed: dict[tuple[str, str, str], str] = {}
        self._compress_ms: list[float] = []

    def forward(self, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
        if cache is not None:
            kwargs[cache_kwarg(self.model)] = cache
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def optistack_prepare_context(self, context: str, question: str, rest: str = "") -> str:
        """The compressed document (cached per document, question and rest of the prompt); the
        question and the rest are used to score and size it, never compressed."""
        key = (context, question, rest)
        if key not in self._compressed:
            started = time.perf_counter()
            self._compressed[key] = self.compressor.compress(context, question, rest)
            self._compress_ms.append((time.perf_counter() - started) * 1000.0)
        return self._compressed[key]

    def optistack_prepare_ms(self) -> float | None:
        """Median time of one compression (the scorer's work), None before the first."""
        return statistics.median(self._compress_ms) if self._compress_ms else None

    def __deepcopy__(self, memo: dict[int, Any]) -> "CompressedPromptModel":
        # The compressor (scorer model, tokenizers) is read-only and shared; the served model is copied.
        new = CompressedPromptModel(copy.deepcopy(self.model, memo), self.compressor)
        new._compressed, new._compress_ms = dict(self._compressed), list(self._compress_ms)
        return new


class PromptCompressPass(ConfiguredPass):
    """LLMLingua prompt compression with a local scorer; the served model's weights are untouched."""

    name = "prompt-compress"
    Config = PromptCompressConfig
    takes = frozenset({MODULE})
    lossy = True

    @staticmethod
    def unsavable_reason(info: dict[str, Any]) -> str:
        return ("rewrites prompts at serving time, which is not part of the saved weights; save the model "
                "from a pipeline without prompt-compress and run the compressor when serving")

    def requirements(self) -> Availability:
        avail = offline_available()
        if not avail:
            return avail
        cfg = self.config
        if cfg.method == "llmlingua2" and not cfg.model:
            return Availability.no("method=llmlingua2 needs a local token-classification checkpoint folder: "
                                   "prompt-compress{method=llmlingua2,model=/path/to/checkpoint}")
        if cfg.model:
            why = checkpoint_problem(cfg.model, want_token_classifier=cfg.method == "llmlingua2")
            if why:
                return Availability.no(why)
        return Availability.yes()

    def _model_dir(self) -> str:
        if self.config.model:
            return str(Path(self.config.model).expanduser())
        from ...bundled_models import smollm2_dir

        return str(smollm2_dir())

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        kind = getattr(ctx.workload, "kind", None)
        if kind != "causal-lm":
            raise PassApplyError(f"prompt-compress: compresses prompts of a causal LM; the workload is "
                                 f"{kind or 'not given'} (use a causal-lm workload such as smollm2-qa)")
        if not isinstance(model, torch.nn.Module):
            raise PassApplyError(f"prompt-compress: needs a torch module to wrap, got {type(model).__name__}")
        avail = self.requirements()
        if not avail:
            raise PassApplyError(f"prompt-compress: {avail.reason}")
        model_dir = self._model_dir()
        compressor = LinguaCompressor(self.config, model_dir)
        info = {"method": self.config.method, "level": self.config.level, "scorer": Path(model_dir).name,
                "target": self.config.target_tokens or self.config.rate}
        if not rewrites_prompts(ctx.workload):
            info["note"] = "the workload does not call optistack_prepare_context: prompts reach the model unchanged"
        return PassResult(CompressedPromptModel(model, compressor), modified=True, info=info)
