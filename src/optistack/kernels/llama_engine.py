"""The C++ serving engine (csrc/cpu/llama_decode.cpp) built from a Llama-family model.

`EngineWeights.from_model(model)` repacks an int4-quantized LlamaForCausalLM (or Mistral, Qwen2, Qwen3, SmolLM3)
once:
q, k and v into one int4 matrix, gate and up into another, every projection in the engine's unit
layout (int4_q8_gemv.cpp), the head as int8 rows (the exact mode: a float head as the model's own float32).
The result holds every tensor by name (`EngineBlock`
per decoder layer, `Q4Projection` per matrix) and hands the C++ engine the same names (`EngineSpec`).
`weights.runtime(slots, length)` (engine_runtime.py) then gives an engine with a KV cache of that many
slots and positions, which runs any rows (token, slot, position) in one call.

`unsupported(model)` says in one sentence why a model cannot run on the engine (None when it can):
the engine serves what it computes exactly as transformers does (RMSNorm, RoPE from the model's own
tables, grouped-query attention, SwiGLU, Qwen3's RMSNorm of each query and key head before RoPE, SmolLM3's
layers without RoPE), and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .engine_projection import UNIT, Q4Projection, _projection, _units, int4_grid  # noqa: F401 (their home before)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


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
        why = _head_norms_reason(i, layer.self_attn, _norm(inner.norm)[1])
        if why:
            return why
    window = attention_window(model)
    if window is not None and (not isinstance(window, int) or window < 1):
        return f"the model's sliding window must be a positive number of positions; it is {window!r}"
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return "the decode engine's head has no bias; this model's lm_head has one"
    return _projection_reason("lm_head", head) if _is_int4(head) else None


def attention_window(model: Any) -> int | None:
    """The fewest past positions any layer attends to (Mistral's `sliding_window`, a Qwen2 layer's), or None.
    The engine attends to every position of a sequence; up to that many positions that is what the window
    lets through (transformers: key k is seen from query q when q - k < window), so the engine holds sequences
    of up to that length and longer ones run the model's own loop (`EngineWeights.max_positions`)."""
    config = model.config
    windows = [w for w in (getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers)
               if w is not None]
    w = getattr(config, "sliding_window", None)
    if w is not None and getattr(config, "use_sliding_window", config.model_type == "mistral"):
        windows.append(w)  # Mistral's attention reads the config's window, whatever its layers say
    return min(windows) if windows else None


def _as_is(w: torch.Tensor) -> torch.Tensor:
    """A model's float32 parameter itself where the engine can read it (so a deep copy of the model and its
    engine together still holds one copy: a Parameter's deepcopy clones its data, which a detached view of it
    would not follow), else a float32 contiguous copy."""
    return w if w.dtype == torch.float32 and w.is_contiguous() else w.detach().float().contiguous()


def _embedding(emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, row scales): an `Int8Embedding`'s int8 codes and scales themselves, else the float32 table
    (`_as_is`) and no scales."""
    from ..layers.int8_embedding import Int8Embedding

    if isinstance(emb, Int8Embedding):
        return emb.qweight.contiguous(), emb.scale.float().contiguous()
    return _as_is(emb.weight), torch.empty(0)


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(m, "variance_epsilon", None)
    eps = getattr(m, "eps", 1e-6) if eps is None else eps
    return _as_is(m.weight), float(eps)


def _head_norms(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_norm, k_norm) weights [head_dim] of an attention that normalizes each query and key head before
    RoPE (Qwen3), each empty where there is none."""
    return tuple(_as_is(m.weight) if m is not None else torch.empty(0)  # type: ignore[return-value]
                 for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))


def _head_norms_reason(i: int, attn: nn.Module, eps: float) -> str | None:
    """Why layer `i`'s per-head q/k norms are not ones the engine computes (an RMSNorm over one head with a
    weight of head_dim values and the model's eps), or None."""
    d = getattr(attn, "head_dim", None)
    for name in ("q_norm", "k_norm"):
        m = getattr(attn, name, None)
        if m is None:
            continue
        w = getattr(m, "weight", None)
        if not ("RMSNorm" in type(m).__name__ and isinstance(w, torch.Tensor) and tuple(w.shape) == (d,)):
            return (f"layer {i} self_attn.{name} is a {type(m).__name__}; the engine computes an RMSNorm over "
                    f"each head's {d} channels")
        if not math.isclose(_norm(m)[1], eps, rel_tol=1e-6):
            return f"layer {i} self_attn.{name} has eps {_norm(m)[1]}; the engine uses the model's {eps} for every norm"
    return None


def _is_int4(lin: Any) -> bool:
    from ..layers.int4 import Int4Linear
    from .engine_linear import EngineInt4Linear
    from .modules import FusedInt4Linear

    return isinstance(lin, (Int4Linear, EngineInt4Linear)) or (isinstance(lin, FusedInt4Linear)
                                                               and lin.backend == "cpu-cpp")


def _head(model: Any, float_head: bool = False) -> list[torch.Tensor]:
    """[int8 codes, row scales, float32 weight] of the head: the int8 pair, or (`float_head`, a float head) the
    model's own weight as float32 (the same tensor when it already is one), or neither for an int4 head."""
    from ..layers.int8 import Int8Linear

    head = model.get_output_embeddings()
    none = [torch.empty(0, dtype=torch.int8), torch.empty(0)]
    if _is_int4(head):  # the int4 head is a projection in the engine layout (EngineWeights.head4)
        return [*none, torch.empty(0)]
    if isinstance(head, Int8Linear):
        return [head.qweight.contiguous(), head.scale.float().contiguous(), torch.empty(0)]
    w = head.weight.detach().float()
    if float_head:
        return [*none, w.contiguous()]
    # a float head is quantized per row, as head=int8 does
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return [torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous(),
            torch.empty(0)]


@dataclass
class EngineBlock:
    """One decoder layer: its two RMSNorm weights, four projections (q|k|v and gate|up stacked), the per-head
    query and key RMSNorm weights of a Qwen3 layer (empty for the others), and whether it applies RoPE."""

    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv: Q4Projection
    o: Q4Projection
    gate_up: Q4Projection
    down: Q4Projection
    q_norm: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    k_norm: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    rope: bool = True  # False: a SmolLM3 NoPE layer (queries and keys enter attention as projected)

    def native(self, lib: Any, panels: bool = False) -> Any:
        b = lib.EngineLayer()
        b.norm1, b.norm2 = self.norm1, self.norm2
        if self.q_norm.numel():
            b.q_norm = self.q_norm
        if self.k_norm.numel():
            b.k_norm = self.k_norm
        b.rope = self.rope
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
    max_positions: int | None = None  # the model's max_position_embeddings (or its sliding window, if fewer)
    head4: "Q4Projection | None" = None  # an int4 head (then head_q and head_s are empty)
    embed_s: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # an int8 embed's row scales
    window: int | None = None  # the model's sliding window (attention_window), which max_positions respects
    head_f: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # the model's own float32 head (exact mode)

    def positions_limit(self) -> str:
        """What bounds `max_positions`, for messages."""
        if self.window is not None and self.window == self.max_positions:
            return f"the model's sliding window ({self.window})"
        return f"the model's max_position_embeddings ({self.max_positions})"

    @classmethod
    def from_model(cls, model: Any, scales: str = "float32", float_head: bool = False) -> "EngineWeights":
        """`scales="float16"`: each projection's unit scales and zc in 16 bits where that keeps every weight
        within 1% of its quantization step (a tenth fewer bytes a decode step reads); float32 keeps the
        model's own weights exactly (the exact mode). `float_head`: a float (not int8 or int4) head stays
        the model's own float32 weights instead of int8 rows quantized here (the exact mode)."""
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
        emb, emb_s = _embedding(model.get_input_embeddings())
        final, eps = _norm(inner.norm)
        head_q, head_s, head_f = _head(model, float_head)
        blocks = []
        for layer in inner.layers:
            p = _layer_projections(layer)
            gate_up = [p["mlp.gate_up"]] if "mlp.gate_up" in p else [p["mlp.gate_proj"], p["mlp.up_proj"]]
            blocks.append(EngineBlock(
                _norm(layer.input_layernorm)[0], _norm(layer.post_attention_layernorm)[0],
                _projection([p["self_attn.q_proj"], p["self_attn.k_proj"], p["self_attn.v_proj"]], scales),
                _projection([p["self_attn.o_proj"]], scales), _projection(gate_up, scales),
                _projection([p["mlp.down_proj"]], scales), *_head_norms(layer.self_attn),
                rope=bool(getattr(layer.self_attn, "use_rope", True))))
        inter = blocks[0].gate_up.out_features // 2 if blocks else 0
        dims = EngineDims(len(blocks), config.hidden_size, hq, hkv, d, inter, emb.shape[0])
        head = model.get_output_embeddings()
        head4 = _projection([head], scales) if _is_int4(head) else None
        quantized_here = head4 is None and not isinstance(head, Int8Linear) and not head_f.numel()
        window = attention_window(model)
        limits = [n for n in (getattr(config, "max_position_embeddings", None), window) if n]
        return cls(dims, eps, emb, final, head_q, head_s, blocks, inner.rotary_emb, quantized_here,
                   min(limits) if limits else None, head4, emb_s, window, head_f)

    @property
    def nbytes(self) -> int:
        """Bytes the engine's weights take (embedding, head and blocks; a tensor two of them share, once)."""
        tensors = [self.embed, self.embed_s, self.final_norm, self.head_q, self.head_s, self.float_head]
        if self.head4 is not None:
            tensors += [self.head4.q, self.head4.s, self.head4.zc]
        for b in self.blocks:
            tensors += [b.norm1, b.norm2, b.q_norm, b.k_norm]
            tensors += [t for p in (b.qkv, b.o, b.gate_up, b.down) for t in (p.q, p.s, p.zc, p.bias)]
        held = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()): t.numel() * t.element_size()
                for t in tensors if t.numel()}
        return sum(held.values())

    @property
    def float_head(self) -> torch.Tensor:
        """The model's own float32 head the engine reads (empty when it reads int8 or int4 rows); weights
        pickled before it existed have none."""
        head_f = getattr(self, "head_f", None)
        return head_f if head_f is not None else torch.empty(0)

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
        if self.embed_s.numel():
            s.embed_s = self.embed_s
        if self.head4 is not None:
            s.head4 = self.head4.native(lib)
        if self.float_head.numel():
            s.head_f = self.float_head
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
