"""Pass configs are frozen dataclasses; this module turns text/JSON options into them and back.

Only plain JSON scalars are allowed as option values (bool, int, float, str, None) so a config can be
printed in pipeline text, stored in a report and loaded again without pickle.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import PassConfigError, closest

_SCALARS = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base for pass configs. Subclasses add fields with defaults and validate in `__post_init__`."""

    def to_dict(self, *, non_default_only: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if non_default_only and f.default is not dataclasses.MISSING and value == f.default:
                continue
            out[f.name] = value
        return out


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choices(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    return None


def _coerce(pass_name: str, key: str, raw: Any, tp: Any) -> Any:
    """Convert `raw` (text from pipeline syntax, or a JSON value) to the field's declared type."""
    where = f"{pass_name}: option '{key}'"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))):
            return None
        errors: list[str] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(pass_name, key, raw, arg)
            except PassConfigError as exc:  # a list of choices says more than a type: it goes first
                errors.insert(0 if _choices(arg) is not None else len(errors), str(exc))
        raise PassConfigError(errors[0] if errors else f"{where}: cannot use {raw!r}")
    choices = _choices(tp)
    if choices is not None:
        for choice in choices:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw):
                return choice
        valid = ", ".join(str(c) for c in choices)
        raise PassConfigError(f"{where} must be one of {valid}; got {raw!r}{closest(str(raw), map(str, choices))}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise PassConfigError(f"{where} must be true or false; got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise PassConfigError(f"{where} must be an integer; got {raw!r}")
        try:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        except (TypeError, ValueError):
            raise PassConfigError(f"{where} must be an integer; got {raw!r}") from None
    if tp is float:
        if isinstance(raw, bool):
            raise PassConfigError(f"{where} must be a number; got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise PassConfigError(f"{where} must be a number; got {raw!r}") from None
    if tp is str:
        if not isinstance(raw, str):
            raise PassConfigError(f"{where} must be text; got {raw!r}")
        return raw
    raise PassConfigError(f"{where} has unsupported type {tp!r} (configs hold JSON scalars only)")


def build_config(pass_name: str, config_cls: type[PassConfig], options: dict[str, Any]) -> PassConfig:
    """Make `config_cls` from text or JSON options, with errors naming the pass and valid options."""
    hints = _resolved_types(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(this pass takes no options)"
            raise PassConfigError(
                f"{pass_name}: unknown option '{key}'{closest(key, fields)}; valid options: {valid}"
            )
        kwargs[key] = _coerce(pass_name, key, raw, hints[key])
    try:
        return config_cls(**kwargs)
    except PassConfigError as exc:
        if str(exc).startswith(pass_name):
            raise
        raise PassConfigError(f"{pass_name}: {exc}") from None


def format_value(value: Any) -> str:
    """Text form of an option value; `build_config` reads it back to an equal value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, _SCALARS):
        raise PassConfigError(f"option value {value!r} is not a JSON scalar")
    return str(value)


def check_regex(pass_name: str, option: str, pattern: str) -> None:
    """A `skip`-style option must compile as a regular expression; the error says why it does not.

    `pass_name` may be "" for a config shared by several passes: `build_config` then prefixes the name.
    """
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        prefix = f"{pass_name}: " if pass_name else ""
        raise PassConfigError(f"{prefix}option '{option}' must be a regular expression; "
                              f"{pattern!r} is not ({exc})") from None


def check(condition: bool, message: str) -> None:
    """`raise PassConfigError(message)` unless `condition`: validation that survives `python -O`."""
    if not condition:
        raise PassConfigError(message)
