"""Named pipelines (`@llm-decode`, `@encoder-latency`): the best chain we know, chosen for this machine.

A preset is written `@name` wherever pipeline text is accepted (`Pipeline.parse("@llm-decode")`,
`optistack run --pipeline @llm-decode`) and composes with passes like any item
(`"prune-structured{sparsity=0.3},@encoder-latency"`). It expands at parse time to ordinary pass text,
so `str(pipeline)` and the report's `pipeline` hold the expansion and the run stays reproducible on
another machine; the report's `preset` keeps the text as written.

Each preset is an ordered list of variants; the first whose `when` the machine has wins (`"*"`: any).
Machine features: `cuda` (a usable CUDA device), `amx` (AMX tiles), `avx512_bf16`, `avx512_vnni`, `avx512`,
`avx2`.
Edit the table below when a measurement finds a better chain; say where the number came from.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

from .core.errors import PipelineParseError, closest
from .kernels.build import cpu_flags  # the one reader of /proc/cpuinfo's flags (stdlib only)

ANY = "*"
FEATURES = ("cuda", "amx", "avx512_bf16", "avx512_vnni", "avx512", "avx2")


@dataclass(frozen=True)
class Variant:
    when: str  # a feature from FEATURES, or "*" (any machine)
    pipeline: str  # ordinary pass text, no presets inside
    why: str  # where the choice comes from (what was measured, where)


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    variants: tuple[Variant, ...]  # tried in order; the last one is "*"

    def choose(self, features: Iterable[str]) -> Variant:
        have = set(features)
        for v in self.variants:
            if v.when == ANY or v.when in have:
                return v
        raise PipelineParseError(f"preset @{self.name} has no variant for a machine with {sorted(have) or 'no features'}")


# float zero points: the lower-error int4 grid (this chain is run, not exported); an int8 head (+0.11%
# perplexity on SmolLM2) instead of the fp32 one, half of whose bytes a decoded token reads
_LLM_CPU = "awq{head=int8,zero_grid=float},fuse-kernels,kv-cache{impl=static},compile{freezing=true,cpp_wrapper=true}"
# the whole decode step in one C++ call (passes/decoding/engine.py); fuse-kernels for the prefill (TTFT);
# embed-int8: the embedding as int8 rows, on a tied model the int8 head's own (SmolLM2: -108 MB, perplexity
# 15.8765 -> 15.8775 after this awq; a ~1.1B Llama loaded: 1.40 -> 1.20 GB resident; docs/passes.md)
_LLM_ENGINE = "awq{head=int8,zero_grid=float},embed-int8,fuse-kernels,decode-engine"
_INT8_ENCODER = "pt2e-int8{mixed=bf16}"  # int8 linears on oneDNN (AMX/VNNI), the rest in bf16

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("llm-decode", "causal LM decode tokens/s at batch 1 (int4 weights, int8 head; the C++ decode engine "
                         "where the CPU has VNNI, else fused kernels and a compiled step)", (
        Variant("cuda", "awq,fuse-kernels,kv-cache{impl=static},compile{mode=max-autotune}",
                "CUDA: the GPU int4 kernels and a CUDA-graphed decode step (not yet measured here)"),
        Variant("avx512_vnni", _LLM_ENGINE, "SmolLM2-135M, 2 cores, side by side with llama.cpp 0.3.36 (native build, "
                "same GGUF, benchmarks/peers/test_llama_cpp.py): Xeon with AMX 373 tokens/s vs 264 (1.41x, median, "
                "2026-12-05); AMD Zen 4 262 vs 115 / 84.5 (llama.cpp before / after ours), TTFT 88 ms vs 537 (2026-12-07)"),
        Variant(ANY, _LLM_CPU, "no AVX512-VNNI: fused int4 kernels (AVX2 at most) and a compiled decode step; "
                               "74.9 tokens/s on the AMX Xeon where the engine is not used (2026-12-02)"),
    )),
    Preset("encoder-latency", "encoder latency at a fixed batch (bf16 on the matrix units where the CPU has them, else int8)", (
        Variant("cuda", "cast{dtype=fp16},compile", "CUDA: fp16 tensor cores (not yet measured here)"),
        Variant("amx", _INT8_ENCODER, "MiniLM 8x128, Xeon with AMX, 2 threads, one process with OpenVINO 2026.4: 20.0 ms vs "
                "OpenVINO bf16 24.0 ms (1.20x; 4.22x eager fp32) at cosine 0.993 (benchmarks/peers, quiet, 2026-12-02)"),
        Variant("avx512_bf16", _INT8_ENCODER, "no AMX (AMD Zen 4): MiniLM 8x128, 2 threads, one process with OpenVINO "
                "2026.4: 55.2 ms vs OpenVINO bf16 72.2 ms (1.31x, repeats 1.25-1.32x; all-bf16 compiled 78.6 ms) at "
                "cosine 0.993 (benchmarks/peers/test_encoder_peers.py --repeats 3, 2026-12-07)"),
        Variant(ANY, "int8-dynamic,compile", "no bf16 hardware: int8 (VNNI where present), 2.2-2.3x on MiniLM"),
    )),
)}


@functools.lru_cache(maxsize=1)
def machine_features() -> frozenset[str]:
    """What this machine has, from /proc/cpuinfo flags (Linux), else torch's CPU capability probes."""
    found: set[str] = set()
    flags = cpu_flags()
    if flags:
        found |= {"amx"} if {"amx_tile", "amx_bf16"} <= flags else set()
        found |= {"avx512_bf16"} if "avx512_bf16" in flags else set()
        found |= {"avx512_vnni"} if "avx512_vnni" in flags else set()
        found |= {"avx512"} if "avx512f" in flags else set()
        found |= {"avx2"} if "avx2" in flags else set()
    else:
        found |= _torch_cpu_features()
    try:
        import torch

        if torch.cuda.is_available():
            found.add("cuda")
    except Exception:  # no torch, or a broken CUDA install: a CPU machine as far as presets go
        pass
    return frozenset(found)


def _torch_cpu_features() -> set[str]:
    found: set[str] = set()
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
        found |= {"avx512", "avx2"} if "AVX512" in capability else ({"avx2"} if "AVX2" in capability else set())
        probes = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
        for feature, probe in probes.items():
            fn = getattr(torch.cpu, probe, None)
            if fn is not None and fn():
                found.add(feature)
    except Exception:
        pass
    return found


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called `name` (with or without the leading '@'); one clear error naming the valid ones."""
    bare = name[1:] if name.startswith("@") else name
    if bare not in PRESETS:
        valid = ", ".join("@" + n for n in preset_names())
        hint = closest(bare, PRESETS).replace("mean '", "mean '@")
        raise PipelineParseError(f"unknown preset '@{bare}'{hint}; valid presets: {valid} (see `optistack presets`)")
    return PRESETS[bare]


def expand_preset(name: str, features: Iterable[str] | None = None) -> str:
    """The pass text `@name` stands for on a machine with `features` (default: this machine)."""
    preset = get_preset(name)
    return preset.choose(machine_features() if features is None else features).pipeline


def describe_presets(features: Iterable[str] | None = None) -> list[dict[str, object]]:
    """One row per preset: name, summary, the chosen expansion here and why, and every variant."""
    have = machine_features() if features is None else frozenset(features)
    rows = []
    for name in preset_names():
        p = PRESETS[name]
        chosen = p.choose(have)
        rows.append({"name": "@" + name, "summary": p.summary, "expansion": chosen.pipeline,
                     "chosen_for": chosen.when, "why": chosen.why,
                     "variants": [{"when": v.when, "pipeline": v.pipeline, "why": v.why} for v in p.variants]})
    return rows
