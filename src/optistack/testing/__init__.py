"""Test helpers for optistack's own tests and for yours: tiny random-weight models, SQNR, and hardware
predicates with pytest skip markers that name what is missing.

    from optistack.testing import requires, sqnr, tiny_llama, token_inputs

    @requires("amx")                      # skipped, with the reason, on a CPU without AMX tiles
    def test_my_pass_keeps_40_db():
        model, x = tiny_llama(), token_inputs()[0]["input_ids"]
        assert sqnr(model(x).logits, MyPass().apply(model, ctx).model(x).logits) >= 40.0

`import optistack` does not import this package, and it imports pytest only when a marker is built
(`requires(...)`, `requires_cuda`, ...): pytest is a test dependency, not a runtime one.
"""
from __future__ import annotations

from typing import Any

from .hardware import (
    FEATURES,
    cpu_flags,
    cxx_compiler,
    has,
    has_amx,
    has_avx512,
    has_avx512_bf16,
    has_avx512_vnni,
    has_cuda,
    has_cxx_compiler,
    missing,
    requires,
)
from .metrics import sqnr
from .models import (
    ARCHITECTURES,
    image_inputs,
    t5_inputs,
    tiny_bert,
    tiny_cnn,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_llama,
    tiny_llama_workload,
    tiny_mlp,
    tiny_opt,
    tiny_phi3,
    tiny_t5,
    token_inputs,
)

# ready-made markers, built on first access (building one imports pytest)
_MARKERS = {"requires_cuda": "cuda", "requires_avx512": "avx512", "requires_avx512_bf16": "avx512_bf16",
            "requires_avx512_vnni": "avx512_vnni", "requires_amx": "amx", "requires_cxx": "cxx"}

__all__ = [
    "ARCHITECTURES", "FEATURES", "cpu_flags", "cxx_compiler", "has", "has_amx", "has_avx512", "has_avx512_bf16",
    "has_avx512_vnni", "has_cuda", "has_cxx_compiler", "image_inputs", "missing", "requires", "sqnr", "t5_inputs",
    "tiny_bert", "tiny_cnn", "tiny_gpt2", "tiny_gpt_neox", "tiny_llama", "tiny_llama_workload", "tiny_mlp", "tiny_opt",
    "tiny_phi3", "tiny_t5", "token_inputs", *_MARKERS,
]


def __getattr__(name: str) -> Any:
    if name in _MARKERS:
        marker = requires(_MARKERS[name])
        globals()[name] = marker
        return marker
    raise AttributeError(f"module 'optistack.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
