"""`model.generate(...)` through the model's decode strategy: the fast path users already call.

A decoding pass (`decode-engine`, `speculative`, `kv-cache`) sets a strategy or a cache factory on the
model; `install_generate(model)` then puts a `generate` attribute on the very object users hold (the
torch.compile wrapper, if any). It runs `transformers.GenerationMixin.generate` with our `DecodeLoop` as
`custom_generate`: transformers does all the preparation (generation config, logits processors, stopping
criteria, attention mask, max/min new tokens, `streamer.put(prompt)`), and only the decoding loop is ours,
on a session of the strategy (`sessions.open_session`).

What a session cannot serve runs transformers' own loop (the class's `generate`) with ONE UserWarning
saying why: beam search, assisted generation, deprecated modes, a cache passed in, output_attentions /
output_hidden_states, another cache_implementation, token healing, synced GPUs, inputs_embeds, forward
keyword arguments the session does not take, a strategy that refuses the request (e.g. a CPU-only one on
CUDA). `model.generate.last` says which path the last call took (also logged at DEBUG on
`optistack.generation`).
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

from ..core.hooks import CACHE_ATTR, DECODE_ATTR
from ..core.modeling import unwrap_compiled
from .hf_loop import DecodeLoop

log = logging.getLogger("optistack.generation")
SERVED = ("greedy and sampling (num_beams=1) with logits processors, stopping criteria, stop strings, streamers, "
          "left-padded batches and return_dict_in_generate scores/logits")


def strategy_name(model: Any) -> str:
    """The class of what decodes: the decode strategy, else the cache factory, else 'the model'."""
    hook = getattr(model, DECODE_ATTR, None) or getattr(model, CACHE_ATTR, None)
    return type(hook).__name__ if hook is not None else "the model"


class FastGenerate:
    """`generate` installed on a model (see the module docstring). Deep copies and pickles with the model:
    its only state is the model it serves and `last`, the record of the last call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.last: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<optistack generate() through {strategy_name(self.model)} of {type(unwrap_compiled(self.model)).__name__}>"

    def __call__(self, inputs: Any = None, generation_config: Any = None, logits_processor: Any = None,
                 stopping_criteria: Any = None, prefix_allowed_tokens_fn: Any = None, synced_gpus: Any = None,
                 assistant_model: Any = None, streamer: Any = None, negative_prompt_ids: Any = None,
                 negative_prompt_attention_mask: Any = None, custom_generate: Any = None, **kwargs: Any) -> Any:
        from transformers import GenerationMixin

        target = unwrap_compiled(self.model)
        args = dict(inputs=inputs, generation_config=generation_config, logits_processor=logits_processor,
                    stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                    synced_gpus=synced_gpus, assistant_model=assistant_model, streamer=streamer,
                    negative_prompt_ids=negative_prompt_ids, negative_prompt_attention_mask=negative_prompt_attention_mask)
        why, config = self.why_not(target, args, custom_generate, kwargs)
        if why is not None:
            self._fallback(why, stacklevel=3)
            return type(target).generate(target, **args, custom_generate=custom_generate, **kwargs)
        if config is not None and config.stop_strings and kwargs.get("tokenizer") is not None:
            args, kwargs = _own_stop_strings(target, config.stop_strings, args, kwargs)
        loop = DecodeLoop(self.model, streamer, lambda reason: self._fallback(reason, stacklevel=4))
        self.last = {"path": "strategy", "strategy": strategy_name(self.model), "reason": None}
        out = GenerationMixin.generate(target, **args, custom_generate=loop, **kwargs)
        if self.last.get("path") == "strategy":
            self.last = {**self.last, "session": loop.session_type, "calls": loop.calls, "steps": loop.new_tokens}
            log.debug("generate() served by %s (%s): %d calls for %d steps", self.last["strategy"],
                      loop.session_type, loop.calls, loop.new_tokens)
        return out

    def why_not(self, target: Any, args: dict[str, Any], custom_generate: Any, kwargs: dict[str, Any]) -> tuple[str | None, Any]:
        """(why the strategy cannot serve this call or None, the generation config transformers will use)."""
        from transformers import GenerationMixin
        from transformers.generation.configuration_utils import GenerationMode

        if custom_generate is not None:
            return "custom_generate= replaces the decoding loop itself", None
        if getattr(type(target), "generate", None) is not GenerationMixin.generate:
            return f"{type(target).__name__} defines its own generate()", None
        if any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_params")):
            return "a cache was passed in (cache= / past_key_values=); the strategy decodes on caches of its own", None
        if args["synced_gpus"]:
            return "synced_gpus=True (GPUs in lockstep)", None
        if kwargs.get("inputs_embeds") is not None:
            return "inputs_embeds was given; the strategy takes token ids", None
        if kwargs.get("position_ids") is not None:
            return "position_ids was given; a session derives positions from the attention mask", None
        prompt = args["inputs"] if args["inputs"] is not None else kwargs.get("input_ids")
        devices = getattr(getattr(self.model, DECODE_ATTR, None), "device_types", None)
        if devices and getattr(prompt, "device", None) is not None and prompt.device.type not in devices:
            return f"the prompt is on {prompt.device.type}; {strategy_name(self.model)} runs on {', '.join(devices)}", None
        try:
            config, _ = target._prepare_generation_config(args["generation_config"], **kwargs)
        except Exception:  # transformers' own generate raises the same error, with its own message
            return None, None
        mode = config.get_generation_mode(args["assistant_model"])
        if mode in (GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE):
            return f"num_beams={config.num_beams} (beam search)", config
        if mode == GenerationMode.ASSISTED_GENERATION:
            return "assisted generation (assistant_model / prompt_lookup_num_tokens / use_mtp)", config
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            return f"generation mode {mode.value!r}", config
        if config.output_attentions or config.output_hidden_states:
            return "output_attentions / output_hidden_states (a session gives logits only)", config
        if config.cache_implementation not in (None, "dynamic"):
            return f"cache_implementation={config.cache_implementation!r} asks transformers for a cache of its own", config
        if config.token_healing:
            return "token_healing=True", config
        if config.is_assistant:
            return "the model is another model's assistant", config
        return None, config

    def _fallback(self, why: str, stacklevel: int) -> None:
        name = strategy_name(self.model)
        self.last = {"path": "fallback", "strategy": name, "reason": why}
        log.debug("generate() falls back to transformers' loop: %s", why)
        warnings.warn(f"optistack generate(): {why}, which {name} does not serve; running transformers' own decoding "
                      f"loop for this call (served by {name}: {SERVED})", UserWarning, stacklevel=stacklevel)


def _own_stop_strings(target: Any, stops: Any, args: dict[str, Any], kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """Stop strings as a criterion we build: transformers drops `tokenizer=` before calling a custom loop,
    so its own stop-string criterion could not be built (it would raise for the missing tokenizer)."""
    from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

    args, kwargs = dict(args), dict(kwargs)
    args["stopping_criteria"] = StoppingCriteriaList([*(args["stopping_criteria"] or []),
                                                      StopStringCriteria(tokenizer=kwargs["tokenizer"], stop_strings=stops)])
    given = args["generation_config"]
    if given is not None and "stop_strings" not in kwargs and given.stop_strings:
        args["generation_config"] = copy.deepcopy(given)
        args["generation_config"].stop_strings = None
    if given is None or "stop_strings" in kwargs or getattr(target.generation_config, "stop_strings", None):
        kwargs["stop_strings"] = None
    return args, kwargs


def install_generate(model: Any) -> Any:
    """Put `generate` (a `FastGenerate`) on `model`, the object users hold (a torch.compile wrapper too: the
    compiled step then decodes). Only for transformers generators (GenerationMixin); returns `model`."""
    from transformers import GenerationMixin

    if isinstance(unwrap_compiled(model), GenerationMixin):
        object.__setattr__(model, "generate", FastGenerate(model))
    return model


def uninstall_generate(model: Any) -> None:
    """Remove an installed `generate` (the class's own is used again)."""
    if isinstance(model.__dict__.get("generate"), FastGenerate):
        object.__delattr__(model, "generate")


def carry_generate(compiled: Any) -> Any:
    """For a pass that wraps a model (torch.compile): when the module under `compiled` has our `generate`,
    install one on `compiled` too, so generate() decodes through the wrapper (the compiled step)."""
    inner = unwrap_compiled(compiled)
    if inner is not compiled and isinstance(inner.__dict__.get("generate"), FastGenerate):
        install_generate(compiled)
    return compiled
