from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from optistack.core.config import PassConfig, build_config, check, format_value
from optistack.core.errors import PassConfigError


@dataclass(frozen=True)
class DemoConfig(PassConfig):
    bits: int = 4
    ratio: float = 0.5
    fast: bool = False
    mode: Literal["a", "b"] = "a"
    backend: Optional[str] = None

    def __post_init__(self):
        check(self.bits in (4, 8), f"demo: bits must be 4 or 8; got {self.bits}")


def test_text_values_are_coerced_to_field_types():
    cfg = build_config("demo", DemoConfig, {"bits": "8", "ratio": "0.25", "fast": "true", "mode": "b", "backend": "none"})
    assert cfg == DemoConfig(bits=8, ratio=0.25, fast=True, mode="b", backend=None)


def test_json_values_are_accepted_as_is():
    assert build_config("demo", DemoConfig, {"bits": 8, "fast": False}).bits == 8


@pytest.mark.parametrize("options,fragment", [
    ({"bitz": "4"}, "unknown option 'bitz' (did you mean 'bits'?); valid options: backend, bits, fast, mode, ratio"),
    ({"bits": "four"}, "option 'bits' must be an integer"),
    ({"bits": "16"}, "bits must be 4 or 8"),
    ({"fast": "maybe"}, "must be true or false"),
    ({"mode": "c"}, "must be one of a, b"),
    ({"ratio": "x"}, "must be a number"),
])
def test_bad_options_name_the_pass_and_what_is_valid(options, fragment):
    with pytest.raises(PassConfigError) as info:
        build_config("demo", DemoConfig, options)
    assert str(info.value).startswith("demo")
    assert fragment in str(info.value)


def test_configs_are_frozen_and_print_only_non_defaults():
    cfg = DemoConfig(bits=8)
    with pytest.raises(Exception):
        cfg.bits = 4  # type: ignore[misc]
    assert cfg.to_dict(non_default_only=True) == {"bits": 8}
    assert format_value(None) == "none" and format_value(True) == "true" and format_value(0.5) == "0.5"
