"""Type checks for what a saved manifest may say: each check returns what is wrong, or None.

`optistack.load_model` reads only keys a schema names, each with its type and range; an unknown key is
refused by name. Checks are plain functions so the registry (load_registry.py) reads as a table.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from .errors import LoadError

Check = Callable[[Any], "str | None"]

# torch dtypes a saved module may name (getattr(torch, name) is only ever called for these)
DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
                    "bool", "float8_e4m3fn", "float8_e5m2"})


def short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to one short line for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(lo: int = 0, hi: int = 1 << 40) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not int:
            return f"must be an integer, got {short(v)}"
        return None if lo <= v <= hi else f"must be in {lo}..{hi}, got {v}"
    return check


def number(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        if type(v) not in (int, float) or not math.isfinite(v):
            return f"must be a finite number, got {short(v)}"
        return None if lo <= v <= hi else f"must be in {lo}..{hi}, got {v}"
    return check


def boolean(v: Any) -> str | None:
    return None if type(v) is bool else f"must be true or false, got {short(v)}"


def choice(*values: Any) -> Check:
    def check(v: Any) -> str | None:
        ok = any(type(v) is type(c) and v == c for c in values)
        return None if ok else f"must be one of {', '.join(short(c) for c in values)}; got {short(v)}"
    return check


def optional(inner: Check) -> Check:
    return lambda v: None if v is None else inner(v)


def text(max_len: int = 256) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not str:
            return f"must be a string, got {short(v)}"
        return None if len(v) <= max_len and "\x00" not in v else f"must be a string of at most {max_len} characters"
    return check


def dtype_name(v: Any) -> str | None:
    return None if type(v) is str and v in DTYPES else f"must be a dtype name ({', '.join(sorted(DTYPES))}); got {short(v)}"


def shape(v: Any) -> str | None:
    if type(v) is not list or len(v) > 8 or any(type(d) is not int or not 0 <= d <= 1 << 40 for d in v):
        return f"must be a shape (a list of at most 8 non-negative integers), got {short(v)}"
    return None


def list_of(inner: Check, max_len: int = 4096) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not list or len(v) > max_len:
            return f"must be a list of at most {max_len} items, got {short(v)}"
        for i, item in enumerate(v):
            why = inner(item)
            if why:
                return f"item {i} {why}"
        return None
    return check


def scalar_map(max_len: int = 256) -> Check:
    """A flat {str: JSON scalar} (e.g. an ONNX model's `meta` facts)."""
    def check(v: Any) -> str | None:
        if type(v) is not dict or len(v) > max_len:
            return f"must be an object of at most {max_len} entries, got {short(v)}"
        for key, item in v.items():
            if type(key) is not str or len(key) > 256:
                return f"key {short(key)} must be a short string"
            if item is not None and type(item) not in (bool, int, float, str):
                return f"entry {key!r} must be a number, string, true/false or null, got {short(item)}"
            if type(item) is str and len(item) > 4096:
                return f"entry {key!r} is too long"
        return None
    return check


def record(fields: Mapping[str, Check], required: frozenset[str] | set[str] = frozenset()) -> Check:
    """A nested object checked like a spec (for specs inside specs, e.g. a fused MLP's projections)."""
    def check(v: Any) -> str | None:
        try:
            check_fields(v, fields, required, "value")
        except LoadError as exc:
            return str(exc).removeprefix("value").lstrip(": ")
        return None
    return check


def check_fields(value: Any, fields: Mapping[str, Check], required: frozenset[str] | set[str], where: str,
                 what: str = "") -> dict[str, Any]:
    """`value` as a dict whose keys are all in `fields` (unknown keys refused by name), each valid."""
    if type(value) is not dict:
        raise LoadError(f"{where}: must be an object, got {short(value)}")
    for key in value:
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise LoadError(f"{where}: unknown key {short(key)}{' for ' + what if what else ''} (allowed: {allowed})")
    for key in sorted(required):
        if key not in value:
            raise LoadError(f"{where}: missing key '{key}'{' for ' + what if what else ''}")
    for key, item in value.items():
        why = fields[key](item)
        if why:
            raise LoadError(f"{where}.{key}: {why}")
    return value
