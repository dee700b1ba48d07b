"""The decoding loop generate() runs on a decode session, in place of transformers' `_sample`.

transformers prepares everything (generation config, logits processors, stopping criteria, attention
mask, `streamer.put(prompt)`) and calls `DecodeLoop` as its `custom_generate`; the loop reproduces
`GenerationMixin._sample` step for step (the same processors on the same prefix, `torch.multinomial` on
the same probabilities in the same order, pad for finished rows, stopping criteria, streamer), only the
model calls go to the session. A speculative session (one with `propose`) verifies a draft of k tokens
in one `extend` of k+1 when decoding greedily with one row; each verified position is then taken as
`_sample` would take it (processors on its own prefix, stopping criteria and streamer per token).
"""
from __future__ import annotations

from typing import Any

import torch

# What generate() leaves in model_kwargs for a decoder-only LM; anything else goes to the model's forward,
# which a session does not take, so `_sample` serves it (the attention mask is the session's input, the
# positions it derives from the mask exactly as transformers does).
SERVED_MODEL_KWARGS = frozenset({"attention_mask", "position_ids", "logits_to_keep", "use_cache", "cache"})


def _owned(logits: torch.Tensor, keep: bool) -> torch.Tensor:
    """A normal tensor when processors may write into it or it is returned (scores/logits): the one copy
    `_sample` makes too. Plain greedy only takes the argmax: no copy."""
    return logits.clone() if keep and logits.is_inference() else logits


def _close(session: Any) -> None:
    if session is not None:
        with torch.inference_mode():
            session.close()


def _plain_stops(criteria: Any) -> tuple[int, frozenset[int], float] | None:
    """(max length, EOS ids, the length up to which they decide alone) when the criteria are only
    transformers' own MaxLengthCriteria and EosTokenCriteria: one row's stop is then two Python checks per
    token instead of a call that builds tensors (55 us a token under cProfile, of a ~3 ms token). Past a max_position_embeddings
    the criteria are called, so transformers' reminder is still logged. None for anything else."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    lengths, eos, limit = [], set(), float("inf")
    for c in criteria:
        if type(c) is MaxLengthCriteria:
            lengths.append(c.max_length)
            if c.max_position_embeddings is not None:
                limit = min(limit, c.max_position_embeddings)
        elif type(c) is EosTokenCriteria:
            eos.update(int(t) for t in torch.as_tensor(c.eos_token_id).reshape(-1).tolist())
        else:
            return None
    return (min(lengths) if lengths else float("inf")), frozenset(eos), limit


class _Unserved(Exception):
    """Raised before the first token: the loop hands the call to transformers' `_sample`."""


class DecodeLoop:
    """transformers' `custom_generate` callable (its signature is `_sample`'s, so transformers passes it
    nothing new). `held` is the callable that decodes (the torch.compile wrapper users hold, if any);
    `streamer` is passed here because transformers keeps it from a custom loop."""

    def __init__(self, held: Any, streamer: Any, on_fallback: Any) -> None:
        self.held, self.streamer, self.on_fallback = held, streamer, on_fallback
        self.session_type = ""
        self.calls = self.new_tokens = 0

    def __call__(self, model: Any, input_ids: torch.LongTensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, synced_gpus: bool = False, streamer: Any = None, **model_kwargs: Any) -> Any:
        from .sessions import SessionUnavailable, open_session

        extra = sorted(k for k, v in model_kwargs.items() if k not in SERVED_MODEL_KWARGS and v is not None)
        session = None
        try:
            if extra:
                raise _Unserved(f"model keyword arguments {extra} go to the model's forward, which a decode session "
                                "does not take")
            try:
                with torch.inference_mode():
                    session = open_session(self.held, input_ids.shape[0], generation_config.max_length)
            except SessionUnavailable as exc:
                raise _Unserved(str(exc)) from exc
            self.session_type = type(session).__name__
            return self._decode(session, input_ids, model_kwargs.get("attention_mask"), logits_processor,
                                stopping_criteria, generation_config)
        except _Unserved as why:
            _close(session)
            session = None
            self.on_fallback(str(why))
            return type(model)._sample(model, input_ids, logits_processor=logits_processor,
                                       stopping_criteria=stopping_criteria, generation_config=generation_config,
                                       synced_gpus=synced_gpus, streamer=self.streamer, **model_kwargs)
        finally:
            _close(session)

    def _decode(self, session: Any, input_ids: torch.Tensor, mask: torch.Tensor | None, processors: Any,
                criteria: Any, config: Any) -> Any:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        from .sessions import SessionUnavailable

        pad = config._pad_token_tensor
        pad = pad.to(input_ids.device) if pad is not None else None
        want_dict = config.return_dict_in_generate
        scores = () if want_dict and config.output_scores else None
        raw = () if want_dict and config.output_logits else None
        batch = input_ids.shape[0]
        # at batch 1 the loop returns as soon as the row finishes, so no finished row is ever padded
        has_eos = batch > 1 and any(hasattr(c, "eos_token_id") for c in criteria)
        do_sample = config.do_sample
        unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        streamer = self.streamer
        keep = len(processors) > 0 or want_dict
        speculate = (hasattr(session, "propose") and not do_sample and batch == 1 and mask is None)
        plain = _plain_stops(criteria) if batch == 1 else None
        try:
            with torch.inference_mode():
                logits = session.prefill(input_ids, mask)
        except SessionUnavailable as exc:
            raise _Unserved(str(exc)) from exc
        logits = _owned(logits, keep)
        self.calls = 1
        feed: list[int] = []  # the tokens of a verification step after the last accepted one (drafts)
        while True:
            for i in range(logits.shape[1] if logits.dim() == 3 else 1):
                step_logits = logits[:, i] if logits.dim() == 3 else logits
                step_scores = processors(input_ids, step_logits) if len(processors) else step_logits
                if scores is not None:
                    scores += (step_scores,)
                if raw is not None:
                    raw += (step_logits,)
                if do_sample:
                    probs = torch.nn.functional.softmax(step_scores, dim=-1)
                    next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
                else:
                    next_tokens = step_scores.max(dim=-1).indices  # argmax's index, ~3x faster than argmax
                if has_eos:
                    next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                if plain is not None and input_ids.shape[1] <= plain[2]:
                    done = input_ids.shape[1] >= plain[0] or int(next_tokens[0]) in plain[1]
                else:
                    unfinished = unfinished & ~criteria(input_ids, scores)
                    done = not bool(unfinished.any())
                self.new_tokens += 1
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if done:
                    return self._finish(input_ids, scores, raw, want_dict, GenerateDecoderOnlyOutput)
                if i < len(feed) and int(next_tokens[0]) != feed[i]:  # the target disagrees: drop the rest
                    with torch.inference_mode():
                        session.rewind(input_ids.shape[1] - 1)
                    break
            with torch.inference_mode():
                if speculate:
                    session.accepted(input_ids.shape[1])
                    room = config.max_length - input_ids.shape[1] - 1
                    feed = session.propose(input_ids[0], min(session.num_draft_tokens, room)) if room > 0 else []
                    step = torch.tensor([[int(input_ids[0, -1])] + feed], dtype=input_ids.dtype, device=input_ids.device)
                    logits = session.extend(step)
                else:
                    logits = session.extend(input_ids[:, -1:], unfinished.bool() if batch > 1 else None)[:, -1]
            logits = _owned(logits, keep)
            self.calls += 1

    def _finish(self, input_ids: torch.Tensor, scores: Any, raw: Any, want_dict: bool, output_type: type) -> Any:
        if self.streamer is not None:
            self.streamer.end()
        if not want_dict:
            return input_ids
        # The decode state lives in the session (engine slots, a pooled cache), not in a Cache to hand back.
        return output_type(sequences=input_ids, scores=scores, logits=raw, attentions=None, hidden_states=None, cache=None)
