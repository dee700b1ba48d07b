"""The C++ serving engine (csrc/cpu/llama_decode.cpp) built from a Llama-family model.

`EngineWeights.from_model(model)` repacks an int4-quantized LlamaForCausalLM (or Mistral, Qwen2) once:
q, k and v into one int4 matrix, gate and up into another, every projection in the engine's unit
layout (int4_q8_gemv.cpp), the head as int8 rows. The result holds every tensor by name (`EngineBlock`
per decoder layer, `Q4Projection` per matrix) and hands the C++ engine the same names (`EngineSpec`).
`weights.runtime(slots, length)` (engine_runtime.py) then gives an engine with a KV cache of that many
slots and positions, which runs any rows (token, slot, position) in one call.

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


def int4_grid(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(codes uint8 [N, K padded], scale, zero float32 [N, groups], group size) of any int4 form a pipeline
    leaves (w = (code - 8) * scale + zero): `Int4Linear`, fuse-kernels' CPU `FusedInt4Linear`, decode-engine's
    `EngineInt4Linear` (per 64-channel unit); None for another kind. Save formats read it too."""
    from ..layers.int4 import Int4Linear
    from .engine_linear import EngineInt4Linear
    from .modules import FusedInt4Linear

    if isinstance(lin, Int4Linear):
        from ..layers.int4 import int4_parts

        codes, scale, zero = int4_parts(lin)
        return codes.cpu(), scale.cpu(), zero.cpu(), lin.group_size
    if isinstance(lin, FusedInt4Linear) and lin.backend == "cpu-cpp":
        from .cpu import int4_unpack

        packed = lin.packed()
        codes = int4_unpack(packed["qweight"], lin.out_features, lin.packed_k)
        return codes, packed["scale"].float(), packed["zero"].float(), lin.group_size
    if isinstance(lin, EngineInt4Linear):
        s = lin.s.float()
        return lin.codes(), s, lin.zc.float() + 8 * s, UNIT
    return None


def _int4_parts(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`int4_grid` with the codes cut to the layer's real input width."""
    grid = int4_grid(lin)
    if grid is None:
        raise ValueError(f"{type(lin).__name__} is not an int4 layer the engine reads")
    codes, scale, zero, group = grid
    return codes[:, : lin.in_features], scale, zero, group


def _projection_reason(name: str, lin: Any) -> str | None:
    from ..layers.int4 import Int4Linear
    from .engine_linear import EngineInt4Linear
    from .modules import FusedInt4Linear

    if isinstance(lin, EngineInt4Linear):  # already the engine's layout (a model that shares its weights)
        return None
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


# RoPE scalings whose tables depend on the sequence's length (transformers recomputes them as it grows)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


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
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope in LENGTH_DEPENDENT_ROPE:
        return (f"the decode engine reads one rotary table for every position; this model's {rope!r} RoPE scaling "
                "changes the table with the sequence length")
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
    return _projection_reason("lm_head", head) if _is_int4(head) else None


def _units(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> list[torch.Tensor]:
    """[packed uint8 [N, K/2], unit scale, unit zc float32 [N, K/64]] in the engine layout."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // UNIT, 2, UNIT // 2)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    units, rep = k // UNIT, group // UNIT  # unit u lies in group u // rep (a padded last group included)
    s, z = scale.float(), zero.float()
    return [packed, s.repeat_interleave(rep, dim=1)[:, :units].contiguous(),
            (z - 8 * s).repeat_interleave(rep, dim=1)[:, :units].contiguous()]


def _as_is(w: torch.Tensor) -> torch.Tensor:
    """A model's float32 parameter itself where the engine can read it (so a deep copy of the model and its
    engine together still holds one copy: a Parameter's deepcopy clones its data, which a detached view of it
    would not follow), else a float32 contiguous copy."""
    return w if w.dtype == torch.float32 and w.is_contiguous() else w.detach().float().contiguous()


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(m, "variance_epsilon", None)
    eps = getattr(m, "eps", 1e-6) if eps is None else eps
    return _as_is(m.weight), float(eps)


def _is_int4(lin: Any) -> bool:
    from ..layers.int4 import Int4Linear
    from .engine_linear import EngineInt4Linear
    from .modules import FusedInt4Linear

    return isinstance(lin, (Int4Linear, EngineInt4Linear)) or (isinstance(lin, FusedInt4Linear)
                                                               and lin.backend == "cpu-cpp")


def _head(model: Any) -> list[torch.Tensor]:
    from ..layers.int8 import Int8Linear

    head = model.get_output_embeddings()
    if _is_int4(head):  # the int4 head is a projection in the engine layout (EngineWeights.head4)
        return [torch.empty(0, dtype=torch.int8), torch.empty(0)]
    if isinstance(head, Int8Linear):
        return [head.qweight.contiguous(), head.scale.float().contiguous()]
    w = head.weight.detach().float()  # a float head is quantized per row, as head=int8 does
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return [torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()]


def _halved(s: torch.Tensor, zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """s and zc as float16 when that moves no weight by more than 1% of its quantization step (scales in
    float16's normal range: a relative error of 2^-11), else None (the projection keeps float32)."""
    s16, zc16 = s.half(), zc.half()
    if not (torch.isfinite(s16).all() and torch.isfinite(zc16).all()):
        return None
    step = s.abs()
    # a weight is q * s + zc, q <= 15: its error is at most 15 |ds| + |dzc|
    err = 15 * (s16.float() - s).abs() + (zc16.float() - zc).abs()
    return (s16, zc16) if bool((err <= 0.01 * step).all()) else None


def _projection(lins: list[nn.Module], scales: str = "float32") -> "Q4Projection":
    """One engine projection: the rows of `lins` one after the other; unit scales and zc in `scales`
    (float16 where every unit's weights stay within 1% of a quantization step of float32's)."""
    from .engine_linear import EngineInt4Linear

    if all(isinstance(lin, EngineInt4Linear) for lin in lins):  # the engine's own layout already: no round trip
        packed, s, zc = ([getattr(lin, a) for lin in lins] for a in ("q", "s", "zc"))
        s, zc = [t.float() for t in s], [t.float() for t in zc]  # float16 -> float32 is exact
    else:
        packed, s, zc = zip(*(_units(*_int4_parts(lin)) for lin in lins))
    biases = [getattr(lin, "bias", None) for lin in lins]
    bias = torch.empty(0)
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach().float() if b is not None else torch.zeros(lin.out_features)
                          for b, lin in zip(biases, lins)]).contiguous()
    s_all, zc_all = torch.cat(s).contiguous(), torch.cat(zc).contiguous()
    if scales == "float16":
        s_all, zc_all = _halved(s_all, zc_all) or (s_all, zc_all)
    return Q4Projection(torch.cat(packed).contiguous(), s_all, zc_all, bias)


@dataclass
class Q4Projection:
    """An int4 matrix in the engine layout: codes uint8 [N, K/2], unit scale and zc [N, K/64] (float32, or
    float16: 36 bytes a unit of 64 weights instead of 40), bias [N] or empty."""

    q: torch.Tensor
    s: torch.Tensor
    zc: torch.Tensor
    bias: torch.Tensor
    panels: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # see with_panels

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def __getstate__(self) -> dict:  # panels are made again where wanted, never saved or copied
        return {**self.__dict__, "panels": None}

    def with_panels(self, lib: Any) -> None:
        """Adds the same weights as panels of 16 rows (csrc/cpu/int4_panel.h), made once and shared by every
        engine built from them: a second copy of the codes, for ~1.3x a decode row and ~1.6x a batch of eight
        on a CPU without AMX (SmolLM2, Zen 4, 2 threads; docs/decoding.md)."""
        if self.panels is None and self.out_features % 16 == 0:
            self.panels = tuple(lib.q4_panels(self.q, self.s, self.zc))

    def native(self, lib: Any, panels: bool = False) -> Any:
        p = lib.Q4Proj()
        p.q, p.s, p.zc, p.bias = self.q, self.s, self.zc, self.bias
        if panels and self.panels is not None:
            p.pq, p.pf = self.panels
        return p


@dataclass
class EngineBlock:
    """One decoder layer: its two RMSNorm weights and four projections (q|k|v and gate|up stacked)."""

    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv: Q4Projection
    o: Q4Projection
    gate_up: Q4Projection
    down: Q4Projection

    def native(self, lib: Any, panels: bool = False) -> Any:
        b = lib.EngineLayer()
        b.norm1, b.norm2 = self.norm1, self.norm2
        b.qkv, b.o, b.gate_up, b.down = (p.native(lib, panels) for p in (self.qkv, self.o, self.gate_up, self.down))
        return b


@dataclass(frozen=True)
class EngineDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one position of one slot takes (keys and values of every layer, float16)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * 2


@dataclass
class EngineWeights:
    """Everything an engine needs but its cache, prepared once, by name."""

    dims: EngineDims
    eps: float
    embed: torch.Tensor
    final_norm: torch.Tensor
    head_q: torch.Tensor
    head_s: torch.Tensor
    blocks: list[EngineBlock]
    rotary: Any = field(repr=False)
    head_quantized_here: bool = False
    max_positions: int | None = None  # the model's max_position_embeddings, when it says
    head4: "Q4Projection | None" = None  # an int4 head (then head_q and head_s are empty)

    @classmethod
    def from_model(cls, model: Any, scales: str = "float32") -> "EngineWeights":
        """`scales="float16"`: each projection's unit scales and zc in 16 bits where that keeps every weight
        within 1% of its quantization step (a tenth fewer bytes a decode step reads); float32 keeps the
        model's own weights exactly (the exact mode)."""
        why = unsupported(model)
        if why:
            raise ValueError(why)
        if scales not in ("float32", "float16"):
            raise ValueError(f"scales must be 'float32' or 'float16'; got {scales!r}")
        from ..layers.int8 import Int8Linear

        config, inner = model.config, model.model
        hq = config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        d = getattr(config, "head_dim", None) or config.hidden_size // hq
        emb = _as_is(model.get_input_embeddings().weight)
        final, eps = _norm(inner.norm)
        head_q, head_s = _head(model)
        blocks = []
        for layer in inner.layers:
            p = _layer_projections(layer)
            gate_up = [p["mlp.gate_up"]] if "mlp.gate_up" in p else [p["mlp.gate_proj"], p["mlp.up_proj"]]
            blocks.append(EngineBlock(
                _norm(layer.input_layernorm)[0], _norm(layer.post_attention_layernorm)[0],
                _projection([p["self_attn.q_proj"], p["self_attn.k_proj"], p["self_attn.v_proj"]], scales),
                _projection([p["self_attn.o_proj"]], scales), _projection(gate_up, scales),
                _projection([p["mlp.down_proj"]], scales)))
        inter = blocks[0].gate_up.out_features // 2 if blocks else 0
        dims = EngineDims(len(blocks), config.hidden_size, hq, hkv, d, inter, emb.shape[0])
        head = model.get_output_embeddings()
        head4 = _projection([head], scales) if _is_int4(head) else None
        quantized_here = head4 is None and not isinstance(head, Int8Linear)
        return cls(dims, eps, emb, final, head_q, head_s, blocks, inner.rotary_emb, quantized_here,
                   getattr(config, "max_position_embeddings", None), head4)

    @property
    def nbytes(self) -> int:
        """Bytes the engine's weights take (embedding, head and blocks)."""
        tensors = [self.embed, self.final_norm, self.head_q, self.head_s]
        if self.head4 is not None:
            tensors += [self.head4.q, self.head4.s, self.head4.zc]
        for b in self.blocks:
            tensors += [b.norm1, b.norm2] + [t for p in (b.qkv, b.o, b.gate_up, b.down) for t in (p.q, p.s, p.zc, p.bias)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def code_bytes(self) -> int:
        """Bytes of the blocks' int4 codes (what panels copy)."""
        return sum(p.q.numel() for b in self.blocks for p in (b.qkv, b.o, b.gate_up, b.down))

    def make_panels(self) -> int:
        """Makes every projection's panels (`Q4Projection.with_panels`, once); returns the bytes they take."""
        from . import cpu

        lib, total = cpu.lib(), 0
        for b in self.blocks:
            for p in (b.qkv, b.o, b.gate_up, b.down):
                p.with_panels(lib)
                total += sum(t.numel() * t.element_size() for t in p.panels or ())
        return total

    def spec(self, panels: bool = False) -> Any:
        """The C++ `EngineSpec` naming every tensor (built on each call: cheap, tensors are shared); `panels`:
        with the projections' panels too (made on the first such call)."""
        from . import cpu

        lib = cpu.lib()
        if panels:
            self.make_panels()
        s = lib.EngineSpec()
        d = self.dims
        s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab = (
            d.hidden, d.heads, d.kv_heads, d.head_dim, d.intermediate, d.vocab)
        s.eps = float(self.eps)
        s.embed, s.final_norm, s.head_q, s.head_s = self.embed, self.final_norm, self.head_q, self.head_s
        if self.head4 is not None:
            s.head4 = self.head4.native(lib)
        s.layers = [b.native(lib, panels) for b in self.blocks]
        return s

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D/2] from the model's own rotary embedding (its scaling included)."""
        half = self.dims.head_dim // 2
        pos = torch.arange(length).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), pos)
        cos, sin = cos[0].float(), sin[0].float()
        if cos.shape[-1] != 2 * half or not (torch.equal(cos[:, :half], cos[:, half:])
                                              and torch.equal(sin[:, :half], sin[:, half:])):
            raise ValueError("the decode engine needs rotary tables of the rotate-half form over the whole head")
        return cos[:, :half].contiguous(), sin[:, :half].contiguous()

    def runtime(self, slots: int, length: int, act_bits: int = 8, max_rows: int = 512, kv: str | None = None,
                panels: bool | None = None) -> Any:
        """An engine with a KV cache of `slots` sequences of `length` positions, of type `kv` (float16 by
        default, float32 for act_bits=16, or int8; see engine_runtime.py). `panels` (int8 activations only):
        its decode rows read the projections' panels (`Q4Projection.with_panels`); by default as
        `engine_runtime.default_panels` says for one stream (no AMX, up to 256 MB of codes)."""
        from .engine_runtime import EngineRuntime

        return EngineRuntime(self, slots, length, act_bits, max_rows, kv, panels)
