"""The search space: ordered subsets of candidate passes (with option choices) whose forms chain.

A candidate is pipeline text, where an option that is not text may list choices: `a|b` tries each,
`*` tries every value a Literal or bool option allows (`ort-quantize{per_channel=*}`). Text options
(regexes such as `skip=lm_head|embed`) are never split. In Python a candidate may also be a dict,
`{"ort-quantize": {"per_channel": [True, False]}}`, where a list means choices.

Each choice becomes a *variant* (one pass in canonical text). A pipeline uses a pass name at most once.
"""
from __future__ import annotations

import itertools
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence, Union, get_args, get_origin

from ..core.errors import OptistackError
from ..core.pass_protocol import MODULE, form_after, pass_text
from ..core.registry import get_pass_class
from ..core.syntax import parse_pipeline_text

END = "(end)"  # the sampler's "stop here" choice for a pipeline position
ENUMERATION_LIMIT = 20000  # pipelines listed for the grid sampler / fallback; beyond this, sample only


def _field_choices(tp: Any) -> tuple[Any, ...] | None:
    """Every value a Literal / bool (optionally Optional) option allows; None for open types."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if tp is bool:
        return (False, True)
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = _field_choices(args[0]) if len(args) == 1 else None
        return None if inner is None else (*inner, None)
    return None


def _option_values(pass_name: str, config_cls: type, key: str, raw: Any) -> list[Any]:
    hints = typing.get_type_hints(config_cls)
    if key not in hints:
        return [raw]  # the pass's own config check names the valid options
    tp = hints[key]
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if raw == "*":
        choices = _field_choices(tp)
        if choices is None:
            raise OptistackError(f"candidate {pass_name}: option '{key}' has no fixed set of values, so '*' "
                                 f"cannot list them; write the choices as a|b")
        return list(choices)
    if isinstance(raw, str) and "|" in raw and tp is not str:
        return [part.strip() for part in raw.split("|")]
    return [raw]


def _variants_of(name: str, options: dict[str, Any]) -> list[Any]:
    cls = get_pass_class(name)
    config_cls = getattr(cls, "Config", None)
    keys = list(options)
    value_lists = [_option_values(name, config_cls, k, options[k]) if config_cls else [options[k]] for k in keys]
    return [cls(**dict(zip(keys, combo))) for combo in itertools.product(*value_lists)]


def parse_candidates(candidates: str | Sequence[Any]) -> list[Any]:
    """Candidate specs -> distinct pass objects (one per option choice), in the order given."""
    if isinstance(candidates, (str, dict)):
        candidates = [candidates]
    if not candidates:
        raise OptistackError("search needs at least one candidate pass, e.g. candidates=['int8-dynamic', 'compile']")
    variants: list[Any] = []
    for spec in candidates:
        if isinstance(spec, str):
            items = parse_pipeline_text(spec)
        elif isinstance(spec, dict):
            items = [(name, dict(opts or {})) for name, opts in spec.items()]
        else:
            raise OptistackError(f"a candidate must be pass text or a {{name: {{option: value or [choices]}}}} "
                                 f"dict; got {type(spec).__name__}")
        for name, options in items:
            for p in _variants_of(name, options):
                if all(pass_text(p) != pass_text(v) for v in variants):
                    variants.append(p)
    return variants


@dataclass
class SearchSpace:
    """Variants plus the longest pipeline to try; knows which sequences the form contract allows."""

    variants: list[Any]
    max_length: int
    start_form: str = MODULE

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise OptistackError(f"max_length must be an integer >= 1; got {self.max_length!r}")
        self.by_text = {pass_text(v): v for v in self.variants}

    @property
    def texts(self) -> list[str]:
        return list(self.by_text)

    def chains(self, passes: Sequence[Any]) -> bool:
        """True when the passes' forms chain and no pass name repeats (Pipeline would accept it)."""
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            return False
        form = self.start_form
        for p in passes:
            if form not in p.takes:
                return False
            form = form_after(p, form)
        return True

    def pipeline_text(self, variant_texts: Sequence[str]) -> str | None:
        """Canonical pipeline text for these variants, or None when it is not in the space."""
        if not 1 <= len(variant_texts) <= self.max_length or any(t not in self.by_text for t in variant_texts):
            return None
        passes = [self.by_text[t] for t in variant_texts]
        return ",".join(variant_texts) if self.chains(passes) else None

    def split(self, text: str) -> list[str] | None:
        """Variant texts of a pipeline text, or None when the text is not in this space."""
        from ..core.pipeline import Pipeline

        try:
            parts = [pass_text(p) for p in Pipeline.parse(text, self.start_form).passes]
        except OptistackError:
            return None
        return parts if self.pipeline_text(parts) is not None else None

    def contains(self, text: str) -> bool:
        return self.split(text) is not None

    def singles(self) -> list[str]:
        return [t for t in self.texts if self.pipeline_text([t]) is not None]

    def extensions(self, text: str) -> list[str]:
        """Pipelines one pass longer than `text` (appending any variant the forms allow)."""
        parts = self.split(text) or []
        out = []
        for t in self.texts:
            candidate = self.pipeline_text(parts + [t])
            if candidate is not None:
                out.append(candidate)
        return out

    def enumerate(self, limit: int = ENUMERATION_LIMIT) -> Iterator[str]:
        """Every pipeline in the space, shortest first, stopping after `limit`."""
        count = 0
        for length in range(1, self.max_length + 1):
            for combo in itertools.permutations(self.texts, length):
                text = self.pipeline_text(list(combo))
                if text is not None:
                    yield text
                    count += 1
                    if count >= limit:
                        return

    def size(self, limit: int = ENUMERATION_LIMIT) -> int:
        return sum(1 for _ in self.enumerate(limit))

    def position_params(self, text: str) -> dict[str, str]:
        """The sampler's parameters for a pipeline: step_0 .. step_k, then END if shorter than max_length."""
        parts = self.split(text) or []
        params = {f"step_{i}": t for i, t in enumerate(parts)}
        if len(parts) < self.max_length:
            params[f"step_{len(parts)}"] = END
        return params

    def position_choices(self, position: int) -> list[str]:
        return self.texts if position == 0 else self.texts + [END]
