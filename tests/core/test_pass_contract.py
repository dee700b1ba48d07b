"""The contract every registered pass keeps, checked over the whole registry (built-in and plugins).

A new pass that breaks one of these fails here without anyone writing a test for it: its name is its
entry point, its text form parses back to an equal pass, its forms are real forms, its config
round-trips through JSON, and a pass that cannot run here says why in a sentence.
"""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from optistack.core import registry
from optistack.core.config import PassConfig, build_config
from optistack.core.pass_protocol import FORMS, Pass
from optistack.core.pipeline import Pipeline

NAMES = registry.pass_names()


def _cls(name: str) -> type:
    return registry.get_pass_class(name)


def _other_values(config: PassConfig) -> dict[str, typing.Any]:
    """One non-default value per field where the type offers an obvious one (choices, bools)."""
    hints = typing.get_type_hints(type(config))
    out = {}
    for f in dataclasses.fields(config):
        tp, current = hints[f.name], getattr(config, f.name)
        if typing.get_origin(tp) is typing.Literal:
            others = [c for c in typing.get_args(tp) if c != current]
            if others:
                out[f.name] = others[0]
        elif tp is bool:
            out[f.name] = not current
    return out


def test_the_registry_is_not_empty():
    assert {"identity", "awq", "compile", "int8-dynamic", "fuse-kernels"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_name_is_the_entry_point_and_the_class_is_a_pass(name):
    cls = _cls(name)
    assert cls.name == name
    p = cls()
    assert isinstance(p, Pass), f"{name} does not implement the pass protocol"


@pytest.mark.parametrize("name", NAMES)
def test_forms_are_declared_and_valid(name):
    cls = _cls(name)
    assert cls.takes and set(cls.takes) <= set(FORMS), f"{name}.takes={cls.takes!r}"
    assert cls.gives is None or cls.gives in FORMS, f"{name}.gives={cls.gives!r}"


@pytest.mark.parametrize("name", NAMES)
def test_text_form_parses_back_to_an_equal_pass(name):
    p = _cls(name)()
    parsed = Pipeline.parse(str(p), start_form=sorted(p.takes)[0]).passes
    assert parsed == [p]


@pytest.mark.parametrize("name", NAMES)
def test_non_default_options_round_trip_through_text_and_json(name):
    cls = _cls(name)
    config = cls().config
    if not isinstance(config, PassConfig):
        pytest.skip(f"{name} has no PassConfig")
    for key, value in _other_values(config).items():
        try:
            p = cls(**{key: value})
        except Exception as exc:  # some combinations are refused on purpose; that must be a clear error
            assert str(exc).startswith(name) or name in str(exc), f"{name}{{{key}={value}}}: {exc}"
            continue
        start = sorted(p.takes)[0]
        assert Pipeline.parse(str(p), start_form=start).passes == [p], f"{name}{{{key}={value}}}"
        as_json = json.loads(json.dumps(p.config.to_dict()))
        assert build_config(name, type(p.config), as_json) == p.config


@pytest.mark.parametrize("name", NAMES)
def test_an_unavailable_pass_says_why(name):
    available = _cls(name)().requirements()
    if available.ok:
        assert available.reason in (None, "")
    else:
        assert isinstance(available.reason, str) and len(available.reason.split()) >= 3, available.reason


@pytest.mark.parametrize("name", NAMES)
def test_config_is_frozen(name):
    config = _cls(name)().config
    if not dataclasses.is_dataclass(config):
        pytest.skip(f"{name} has no dataclass config")
    fields = dataclasses.fields(config)
    if not fields:
        return
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, fields[0].name, getattr(config, fields[0].name))
