"""`decode-engine`: decode (and serve) with optistack's C++ engine, one call per step for the whole model.

Every step is one call into csrc/cpu/llama_decode.cpp, which runs all layers, attention over each row's
own filled cache positions, and the head inside one parallel region: no Python, no graph guards, no
fork/join per operator. A call takes any rows (token, cache slot, position): the decode steps of many
requests at once, prompt chunks (on AMX tiles where the CPU has them, else an int8 GEMM) and draft tokens.
It serves int4-quantized Llama, Mistral and Qwen2 models (run `awq` or `rtn-int4` first; `fuse-kernels`
before it is fine) on x86 CPUs with AVX512-VNNI.

The prompt (time to first token) runs where it is fastest: `prefill=auto` gives it to the engine where the
activations are int8 (its prompt chunks run on AMX tiles where the CPU has them, else on its int8 chunk GEMM),
else (the exact mode) to the model's own forward, whose cache is copied into the engine; `model` and `engine`
force one.

With int8 activations the int4 unit scales and zero terms are stored in float16 (`scales`; a projection
whose scales float16 cannot hold within 1% of a quantization step keeps float32): a tenth fewer bytes a
decode step streams. The exact mode keeps float32, the model's own weights.

The KV cache is float16 (float32 in the exact mode); `kv=int8` holds each key and value as int8 codes
with one scale per position and head: ~0.53x float16's bytes, so a server holds about twice the
requests (or contexts) in the same memory. With `kv=auto` a server (serving/engine_backend.py) takes int8.

Numerics: the int4 projections take int8 activations (per 64 channels, as llama.cpp's Q8 blocks; or
int16 with `act=int16`: twice the dot-product work, 15 significant bits like the model's own kernel, the
exact mode), the head int16 ones (as the int8 head; the exact mode keeps a float head as the model's own
float32 weights); everything else is float32. So with int8 the tokens
can differ from the model's own float32-activation decoding where two logits are close. At apply the pass
measures, on the workload's calibration prompts, how often the engine picks the token the model's own
loop picks when both see the same history (teacher-forced top-1 agreement), records it, and refuses the
engine below `min_agreement`.

The strategy is set as the model's `optistack_decode` hook and `generate()` is installed on the model,
so `model.generate()`, `greedy_decode`, the causal-LM workloads and the report's decode tokens/s all
use it, and `serving.EngineBackend` serves it with continuous batching. The model's own int4 projections
then become views of the engine's matrices (`share_weights`, kernels/engine_linear.py): one copy of the
weights in the process, the model's forward running the engine's kernels (int16 activations, AMX-BF16 for
many rows). Where
the engine cannot run (another architecture, a float model, a CPU without VNNI) the step is skipped with
the reason.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import torch

from ...core.config import PassConfig, check
from ...core.errors import PassApplyError
from ...core.heap import release_free_memory
from ...core.hooks import DECODE_ATTR
from ...core.load_registry import register_reapply
from ...core.pass_protocol import MODULE, ConfiguredPass, PassContext, PassResult
from ...core.requirements import Availability, need_packages
from ...generation import greedy_decode, install_generate
from .common import check_prompts, require_causal_lm
from .engine_strategy import LENGTH_BUCKET, EngineDecode, EngineSession  # noqa: F401 (their old home)


@dataclasses.dataclass(frozen=True)
class DecodeEngineConfig(PassConfig):
    act: Literal["int8", "int16"] = "int8"  # the int4 projections' activations: int8 (fast) or int16 (exact)
    prefill: Literal["auto", "model", "engine"] = "auto"  # who runs the prompt (see the module docstring)
    # the KV cache: auto = float16 (float32 with act=int16); int8 = one scale per position and head, about half
    # float16's bytes (twice the requests in the same memory; measured cost in docs/decoding.md)
    kv: Literal["auto", "float16", "float32", "int8"] = "auto"
    # the int4 unit scales and zero terms: auto = float16 with act=int8 (36 bytes a 64-weight unit instead of 40,
    # each weight within 1% of a quantization step), float32 with act=int16 (the model's own weights, exactly)
    scales: Literal["auto", "float16", "float32"] = "auto"
    # the model's own int4 projections become views of the engine's matrices (one copy of the weights in the
    # process; they run the engine's kernels) or stay as they were, beside the engine's copy: auto = shared
    # with act=int8, kept in the exact mode (whose promise is the quantized model's own numerics, prompt included)
    share_weights: Literal["auto", "yes", "no"] = "auto"
    # the projections also as panels of 16 rows, which decode rows read (csrc/cpu/int4_panel.h; a second copy of the
    # int4 codes): auto = with act=int8, for models of up to 256 MB of codes, on every CPU (Zen 4: SmolLM2 decode
    # 1.32x, a batch of 8 1.65x; Xeon with AMX: 1.08x, a batch of 8 1.2x against int8 tiles; the 1.1B 0.98x alone,
    # 1.6x in a batch of 8, so a server takes them at any size: serving/engine_backend.py); needs act=int8
    panels: Literal["auto", "yes", "no"] = "auto"
    check_prompts: int = 2
    check_tokens: int = 32
    min_agreement: float = 0.9

    def __post_init__(self) -> None:
        check(self.check_prompts >= 0, f"decode-engine: option 'check_prompts' must be >= 0; got {self.check_prompts}")
        check(self.check_tokens >= 2, f"decode-engine: option 'check_tokens' must be >= 2; got {self.check_tokens}")
        check(0.0 <= self.min_agreement <= 1.0,
              f"decode-engine: option 'min_agreement' must be within 0..1; got {self.min_agreement}")
        check(self.panels != "yes" or self.act == "int8",
              "decode-engine: option 'panels=yes' needs act=int8 (the exact mode reads the row layout)")


def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)


class DecodeEnginePass(ConfiguredPass):
    """Sets the engine decode strategy; the model's projections then share the engine's repacked weights."""

    name = "decode-engine"
    Config = DecodeEngineConfig
    takes = frozenset({MODULE})
    lossy = True  # int8 activations in the decode step (see the module docstring)
    reapply_on_load = True  # the strategy is an attribute built from the weights, not a tensor
    copy_on_write = True  # packs new engine tensors and swaps in new layers; never writes into its input's tensors

    def requirements(self) -> Availability:
        return need_packages("transformers", extra="hf")

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        from ...kernels.llama_engine import EngineWeights, unsupported

        cfg = self.config
        require_causal_lm(self.name, ctx, model)
        why = unsupported(_unwrap(model))
        if why is None and any(p.device.type != "cpu" for p in model.parameters()):
            why = "the decode engine runs on the CPU; the model is on another device"
        if why:
            return PassResult(model, modified=False, info={"reason": why})
        start = time.perf_counter()
        scales = cfg.scales if cfg.scales != "auto" else ("float16" if cfg.act == "int8" else "float32")
        weights = EngineWeights.from_model(_unwrap(model), scales=scales, float_head=cfg.act == "int16")
        prefill = cfg.prefill
        if prefill == "auto":  # int8: AMX tiles or the int8 chunk GEMM (a 128-token SmolLM2 prompt on a Zen 4: the
            # engine 54 ms, the model's own forward 297 ms); int16 (the exact mode) has neither
            prefill = "engine" if cfg.act == "int8" else "model"
        panels = {"auto": None, "yes": True, "no": False}[cfg.panels]
        decoder = EngineDecode(weights, 16 if cfg.act == "int16" else 8, prefill, None if cfg.kv == "auto" else cfg.kv,
                               panels)
        info: dict[str, Any] = {"act": cfg.act, "prefill": prefill, "kv_cache": decoder.kv, "scales": scales,
                                "weight_mb": round(weights.nbytes / 2**20, 1),
                                "build_s": round(time.perf_counter() - start, 3),
                                "threads": torch.get_num_threads(),
                                "head": "int4" if weights.head4 is not None else
                                        "float32 (the model's own)" if weights.float_head.numel() else
                                        "int8 (quantized by this pass)" if weights.head_quantized_here else "int8"}
        bf16 = _bf16_projections(_unwrap(model)) if cfg.act == "int16" else 0
        if bf16:
            info["exact_reference"] = (f"{bf16} int4 projections run torch's int4pack kernel on bfloat16 activations: "
                                       "the engine's 15 bits can pick another token where two of the model's own "
                                       "logits lie within bfloat16's rounding (fuse-kernels first: float32 ones)")
        prompts = check_prompts(ctx, cfg.check_prompts, weights.dims.vocab) if cfg.check_prompts else []
        matches = compared = 0
        for prompt in prompts:
            reference = greedy_decode(model, prompt, cfg.check_tokens, use_strategy=False).tokens
            m, n = decoder.agreement(model, prompt, reference)
            matches, compared = matches + m, compared + n
        if compared:
            info["top1_agreement"] = round(matches / compared, 4)
            info["agreement_tokens"] = compared
            if matches / compared < cfg.min_agreement:
                raise PassApplyError(f"decode-engine: the engine picks the model's own next token {matches} times in "
                                     f"{compared} (below min_agreement={cfg.min_agreement}); refused")
        if cfg.share_weights == "yes" or (cfg.share_weights == "auto" and cfg.act == "int8"):
            from ...kernels.engine_linear import share_engine_weights

            freed = share_engine_weights(_unwrap(model), weights)
            info["model_weights"] = f"shared with the engine ({freed / 2**20:.1f} MB no longer held twice)"
        else:
            info["model_weights"] = "kept beside the engine's copy"
        from ...kernels.engine_runtime import default_panels

        if panels is None:  # the runtimes' own default for a stream, made now so that their cost shows here
            panels = default_panels(decoder.act_bits, weights.code_bytes)
        info["panels"] = f"yes (+{weights.make_panels() / 2**20:.1f} MB)" if panels else "no"
        object.__setattr__(model, DECODE_ATTR, decoder)
        install_generate(model)  # the user's generate() decodes on the engine (generation/hf_generate.py)
        # the passes before (fuse-kernels' packing, this one's repacking) freed their temporaries in pieces the
        # heap keeps: a ~1.1B Llama's process held 2.13 GB after the chain in place, 1.21 once handed back
        release_free_memory()
        return PassResult(model, modified=True, info=info)


def _bf16_projections(model: Any) -> int:
    """How many of the model's int4 projections compute on bfloat16 activations (torch's int4pack kernel)."""
    from ...layers.int4 import Int4Linear

    return sum(isinstance(m, Int4Linear) and m.act_dtype == torch.bfloat16 for m in model.modules())


register_reapply(DecodeEnginePass)  # numbers only, checked by its config; the engine is rebuilt from the loaded weights
