"""The C++ decode engine (csrc/cpu/llama_decode.cpp) built from a Llama-family model.

`EngineWeights.from_model(model)` repacks an int4-quantized LlamaForCausalLM (or Mistral, Qwen2) once:
q, k and v into one int4 matrix, gate and up into another, every projection in the engine's unit
layout (int4_q8_gemv.cpp), the head as int8 rows. `weights.engine(batch, length)` then gives a
`LlamaEngine` with a float32 KV cache of that capacity; `step(tokens, pos)` runs one whole decode step
(every layer and the head) in one C++ call and returns the logits.

`unsupported(model)` says in one sentence why a model cannot run on the engine (None when it can):
the engine serves what it computes exactly as transformers does (RMSNorm, RoPE from the model's own
tables, grouped-query attention, SwiGLU), and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MODEL_TYPES = ("llama", "mistral", "qwen2")
UNIT = 64  # input channels per scale unit of the engine layout


def _int4_parts(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(codes uint8 [N, K], scale, zero float32 [N, K/g], g) of an int4 layer, or None for another kind."""
    from ..passes.quant.int4_linear import Int4Linear
    from .modules import FusedInt4Linear

    if isinstance(lin, Int4Linear):
        from ..passes.kernels.fuse import int4_parts

        codes, scale, zero = int4_parts(lin)
        return codes[:, : lin.in_features], scale, zero, lin.group_size
    if isinstance(lin, FusedInt4Linear) and lin.backend == "cpu-cpp":
        from .cpu import int4_unpack

        packed = lin.packed()
        codes = int4_unpack(packed["qweight"], lin.out_features, lin.packed_k)
        return codes[:, : lin.in_features], packed["scale"].float(), packed["zero"].float(), lin.group_size
    return None


def _projection_reason(name: str, lin: Any) -> str | None:
    from ..passes.quant.int4_linear import Int4Linear
    from .modules import FusedInt4Linear

    if isinstance(lin, Int4Linear) or (isinstance(lin, FusedInt4Linear) and lin.backend == "cpu-cpp"):
        if lin.in_features % UNIT or lin.group_size % UNIT:
            return (f"{name} has {lin.in_features} input features in groups of {lin.group_size}; the engine "
                    f"needs both multiples of {UNIT}")
        return None
    return f"{name} is a {type(lin).__name__}; the engine runs int4 projections (apply awq or rtn-int4 first)"


def _layer_projections(layer: nn.Module) -> dict[str, Any]:
    attn, mlp = layer.self_attn, layer.mlp
    out = {f"self_attn.{p}": getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if hasattr(mlp, "gate_up"):  # FusedGatedMLP from fuse-kernels
        out["mlp.gate_up"], out["mlp.down_proj"] = mlp.gate_up, mlp.down_proj
    else:
        out.update({f"mlp.{p}": getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")})
    return out


def unsupported(model: Any) -> str | None:
    """Why `model` cannot run on the engine (one sentence), or None when it can."""
    from . import cpu

    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"the decode engine runs {', '.join(MODEL_TYPES)} models; this one is {kind or type(model).__name__}"
    if not cpu.available():
        return cpu.available().reason
    if "avx512_vnni" not in cpu.build.cpu_flags():
        return "the decode engine needs AVX512-VNNI (vpdpbusd); this CPU does not have it"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the decode engine computes SwiGLU; this model's activation is {config.hidden_act}"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", kind == "mistral"):
        return "the decode engine has no sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the decode engine needs transformers' model.model.layers and model.model.rotary_emb"
    for i, layer in enumerate(inner.layers):
        for name, lin in _layer_projections(layer).items():
            why = _projection_reason(f"layer {i} {name}", lin)
            if why:
                return why
        head_dim = getattr(layer.self_attn, "head_dim", None)
        scaling = getattr(layer.self_attn, "scaling", None)
        if head_dim and scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
            return "the decode engine scales attention by 1/sqrt(head_dim); this model uses another scale"
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return "the decode engine's head has no bias; this model's lm_head has one"
    return None


def _units(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> list[torch.Tensor]:
    """[packed uint8 [N, K/2], unit scale, unit zc float32 [N, K/64]] in the engine layout."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // UNIT, 2, UNIT // 2)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    units, rep = k // UNIT, group // UNIT  # unit u lies in group u // rep (a padded last group included)
    s, z = scale.float(), zero.float()
    return [packed, s.repeat_interleave(rep, dim=1)[:, :units].contiguous(),
            (z - 8 * s).repeat_interleave(rep, dim=1)[:, :units].contiguous()]


def _projection(lins: list[nn.Module]) -> list[torch.Tensor]:
    """One engine projection (rows of `lins` one after the other): packed, scale, zc, bias."""
    parts = [_int4_parts(lin) for lin in lins]
    packed, s, zc = zip(*(_units(*p) for p in parts))
    biases = [getattr(lin, "bias", None) for lin in lins]
    bias = torch.empty(0)
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach().float() if b is not None else torch.zeros(lin.out_features)
                          for b, lin in zip(biases, lins)]).contiguous()
    return [torch.cat(packed).contiguous(), torch.cat(s).contiguous(), torch.cat(zc).contiguous(), bias]


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(m, "variance_epsilon", None)
    eps = getattr(m, "eps", 1e-6) if eps is None else eps
    return m.weight.detach().float().contiguous(), float(eps)


def _head(model: Any) -> list[torch.Tensor]:
    from ..passes.quant.head import Int8Linear

    head = model.get_output_embeddings()
    if isinstance(head, Int8Linear):
        return [head.qweight.contiguous(), head.scale.float().contiguous()]
    w = head.weight.detach().float()  # a float head is quantized per row, as head=int8 does
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return [torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()]


@dataclass
class EngineWeights:
    """Everything an engine needs but its cache, prepared once."""

    dims: dict[str, int]
    eps: float
    tensors: list[torch.Tensor]
    rotary: Any = field(repr=False)
    head_quantized_here: bool = False

    @classmethod
    def from_model(cls, model: Any) -> "EngineWeights":
        why = unsupported(model)
        if why:
            raise ValueError(why)
        from ..passes.quant.head import Int8Linear

        config, inner = model.config, model.model
        hq = config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        d = getattr(config, "head_dim", None) or config.hidden_size // hq
        emb = model.get_input_embeddings().weight.detach().float().contiguous()
        final, eps = _norm(inner.norm)
        tensors = [emb, final, *_head(model)]
        layer_tensors = []
        for layer in inner.layers:
            p = _layer_projections(layer)
            gate_up = [p["mlp.gate_up"]] if "mlp.gate_up" in p else [p["mlp.gate_proj"], p["mlp.up_proj"]]
            layer_tensors += [_norm(layer.input_layernorm)[0], _norm(layer.post_attention_layernorm)[0],
                              *_projection([p["self_attn.q_proj"], p["self_attn.k_proj"], p["self_attn.v_proj"]]),
                              *_projection([p["self_attn.o_proj"]]), *_projection(gate_up),
                              *_projection([p["mlp.down_proj"]])]
        inter = layer_tensors[12].shape[0] // 2 if inner.layers else 0  # gate_up scale rows / 2
        dims = {"L": len(inner.layers), "H": config.hidden_size, "Hq": hq, "Hkv": hkv, "D": d, "I": inter,
                "V": emb.shape[0]}
        quantized_here = not isinstance(model.get_output_embeddings(), Int8Linear)
        return cls(dims, eps, tensors + layer_tensors, inner.rotary_emb, quantized_here)

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D/2] from the model's own rotary embedding (its scaling included)."""
        half = self.dims["D"] // 2
        pos = torch.arange(length).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), pos)
        cos, sin = cos[0].float(), sin[0].float()
        if cos.shape[-1] != 2 * half or not (torch.equal(cos[:, :half], cos[:, half:])
                                              and torch.equal(sin[:, :half], sin[:, half:])):
            raise ValueError("the decode engine needs rotary tables of the rotate-half form over the whole head")
        return cos[:, :half].contiguous(), sin[:, :half].contiguous()

    def engine(self, batch: int, length: int, act_bits: int = 8) -> "Engine":
        """A C++ engine for `batch` rows and `length` positions; `act_bits` (8 or 16) is the precision of
        the int4 projections' activations."""
        from . import cpu

        d = self.dims
        cos, sin = self.rope_tables(length)
        shape = (d["L"], batch, d["Hkv"], length, d["D"])
        # int8 activations: a float16 cache (half the bytes attention reads; llama.cpp's default too);
        # int16, the exact mode: float32, as the model's own cache
        dtype = torch.float16 if act_bits == 8 else torch.float32
        k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        dims = [d["L"], d["H"], d["Hq"], d["Hkv"], d["D"], d["I"], d["V"], batch, length, act_bits]
        tensors = self.tensors[:4] + [cos, sin, k, v] + self.tensors[4:]
        return Engine(cpu.lib().LlamaEngine(dims, self.eps, tensors), k, v)


@dataclass
class Engine:
    """One C++ engine with its KV cache [L, B, Hkv, T, D] (float16 or float32, keys after RoPE)."""

    impl: Any
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def load_cache(self, cache: Any, batch: int, length: int) -> None:
        """Copy a transformers cache's first `length` positions (after a prefill) into the engine's."""
        for i, layer in enumerate(cache.layers):
            self.k_cache[i, :batch, :, :length].copy_(layer.keys[:batch, :, :length])
            self.v_cache[i, :batch, :, :length].copy_(layer.values[:batch, :, :length])

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self.impl.step(tokens, pos)
