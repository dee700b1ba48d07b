"""`save_gguf`: a Llama-family model, quantized by optistack or not, as one GGUF file llama.cpp runs.

Each layer gets the ggml type that holds its grid as it is (gguf_blocks.py): int4 asymmetric groups
(AWQ, GPTQ, RTN; integer or float zero points; group 32/64/128) -> Q4_1, symmetric int4 -> Q4_0,
per-channel int8 (heads, `embed-int8`'s embedding rows) -> Q8_0, float linears and a float embedding -> F16
(or F32, `float_type="f32"`),
norms -> F32. The only loss is fp16's rounding of the block scales, reported per layer as the
largest difference from our own dequantized weight. What has no such type (fp8, a row length or
group size that is not a multiple of 32, a module llama.cpp's Llama graph has no place for) is refused
with one error naming the layer, before anything is written.

Tensor names and metadata follow llama.cpp's converter (convert_hf_to_gguf.py; arch "llama", "qwen2"
or "qwen3" after the model's model_type): for "llama" q_proj/k_proj rows are permuted into llama.cpp's
RoPE order (rows of every quantized form move with their scales; the Qwen graphs rotate halves as
transformers does, so their rows stay), Qwen2's q/k/v biases are written beside their weights, Qwen3's
per-head `q_norm`/`k_norm` as `attn_q_norm`/`attn_k_norm`, a tied lm_head is left out (llama.cpp reuses
token_embd), an int8 head of a tied model is written as its own `output.weight`. The tokenizer comes
from gguf_vocab.py. The file is written beside its destination and renamed into place; the model is
only read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.modeling import unwrap_compiled
from ..layers.int8 import Int8Linear
from ..layers.int8_embedding import Int8Embedding
from .compressed_tensors import CheckpointError
from .gguf_blocks import dequantize_blocks, float_tensor, int4_blocks, int8_blocks, rope_rows
from .gguf_int4 import RowSlice, int4_form, stacked_rows

FLOAT_TYPES = {"f16": "F16", "f32": "F32"}
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
              "F32": "ALL_F32"}
BLOCK_NAMES = (("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
               ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
               ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
               ("ffn_down", "mlp.down_proj"))
# llama.cpp's graph per model_type: (does it read q/k rows in its interleaved RoPE order, its extra block tensors)
ARCHS: dict[str, tuple[bool, tuple[tuple[str, str], ...]]] = {
    "llama": (True, ()),
    "qwen2": (False, ()),
    "qwen3": (False, (("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"))),
    "smollm3": (True, ()),  # llama's tensors; llama.cpp skips RoPE in every fourth layer (no key says so)
}


@dataclass
class GgufTensor:
    """One written tensor: its GGUF name, the module it came from, our form, the ggml type chosen and
    the largest |difference| between what llama.cpp will read and our own dequantized weight."""

    name: str
    module: str
    source: str
    ggml_type: str
    max_abs_error: float


@dataclass
class GgufWritten:
    """What `save_gguf` wrote (usable as a path: `os.fspath(written)`)."""

    path: Path
    file_type: str
    tokenizer: str
    tensors: list[GgufTensor] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.path)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        return counts

    def summary(self) -> str:
        """A few lines: file, types, tokenizer, and each distinct (our form -> ggml type) with its worst error."""
        rows: dict[tuple[str, str], list[GgufTensor]] = {}
        for t in self.tensors:
            rows.setdefault((t.source, t.ggml_type), []).append(t)
        lines = [f"GGUF {self.path} ({self.file_type}; tokenizer {self.tokenizer})"]
        for (source, kind), ts in sorted(rows.items(), key=lambda kv: -len(kv[1])):
            worst = max(ts, key=lambda t: t.max_abs_error)
            lines.append(f"  {len(ts):4d} x {source:28s} -> {kind:5s} max |diff| {worst.max_abs_error:.2e} ({worst.name})")
        return "\n".join(lines)


def save_gguf(path: str | Path, model: Any, tokenizer: Any = None, float_type: str = "f16",
              tokenizer_pre: str | None = None, pipeline: str | None = None) -> GgufWritten:
    """Write `model` (or a RunResult's model) to the GGUF file `path`.

    `tokenizer`: a transformers tokenizer, a folder with one, or a .gguf whose tokenizer is copied;
    default: the source GGUF of a model converted from one (the bundled SmolLM2), else the tokenizer
    in the folder the model was loaded from. `float_type`: "f16" or "f32" for float matrices.
    `tokenizer_pre`: llama.cpp's pre-tokenizer name for a vocabulary built from transformers.
    """
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {', '.join(FLOAT_TYPES)}; got {float_type!r}")
    source_model = model
    if hasattr(model, "report") and hasattr(model, "original"):  # a RunResult
        pipeline = pipeline or str(model.pipeline)
        source_model, model = model.original, model.model
    model = unwrap_compiled(model)
    cfg = _check_architecture(model)
    arrays, written = _collect_tensors(model, cfg, FLOAT_TYPES[float_type])
    import gguf

    final = Path(path).expanduser()
    if final.suffix != ".gguf":
        raise ValueError(f"save_gguf writes one .gguf file; got {str(final)!r}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    main_types = [t.ggml_type for t in written if t.name.startswith("blk.") and not t.name.endswith("norm.weight")]
    file_type = max(set(main_types), key=main_types.count) if main_types else "F32"
    writer = gguf.GGUFWriter(str(tmp), cfg.model_type)
    try:
        _write_metadata(writer, cfg, model, file_type, pipeline)
        vocab = _write_tokenizer(writer, tokenizer, source_model, model, int(cfg.vocab_size), tokenizer_pre)
        for t in written:
            data, kind = arrays[t.name]
            raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
            writer.add_tensor(t.name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, final)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GgufWritten(final, file_type, vocab, written)


def _check_architecture(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or cfg is None:
        raise CheckpointError(f"save_gguf writes Hugging Face Llama-family models; this is a {type(model).__name__} "
                              "(a form only optistack runs): use result.save(dir)")
    if getattr(cfg, "model_type", None) not in ARCHS:
        raise CheckpointError(f"save_gguf writes llama.cpp's {', '.join(repr(a) for a in ARCHS)} architectures "
                              "(model_type llama: Llama, SmolLM2, TinyLlama...; qwen2; qwen3; smollm3); this model's "
                              f"model_type is {getattr(cfg, 'model_type', None)!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"llama.cpp's llama graph uses SiLU; this model's hidden_act is {cfg.hidden_act!r}")
    if cfg.model_type == "smollm3":
        want = [int((i + 1) % 4 != 0) for i in range(int(cfg.num_hidden_layers))]
        if list(getattr(cfg, "no_rope_layers", want)) != want:
            raise CheckpointError("llama.cpp's smollm3 graph skips RoPE in every fourth layer; this model's "
                                  f"no_rope_layers is {list(cfg.no_rope_layers)}")
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    if any(getattr(layer.self_attn, "sliding_window", None) is not None for layer in layers
           if hasattr(layer, "self_attn")):
        raise CheckpointError("the model has sliding-window attention layers, which save_gguf does not describe")
    if getattr(cfg, "mlp_bias", False):
        raise CheckpointError("the model has MLP biases (mlp_bias=True), which llama.cpp's llama graph does not add")
    rope = _rope(cfg)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise CheckpointError(f"rope_type {rope.get('rope_type')!r}: save_gguf writes default and linear RoPE only")
    return cfg


def _rope(cfg: Any) -> dict:
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _write_metadata(writer: Any, cfg: Any, model: Any, file_type: str, pipeline: str | None) -> None:
    import gguf

    name = Path(str(getattr(cfg, "_name_or_path", "") or "model")).name
    writer.add_name(name)
    writer.add_quantized_by("optistack")
    if pipeline:
        writer.add_description(f"optimized by optistack: {pipeline}")
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[file_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    head_dim = _head_dim(cfg)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(cfg)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _write_tokenizer(writer: Any, tokenizer: Any, source_model: Any, model: Any, vocab_size: int,
                     pre: str | None) -> str:
    from .gguf_vocab import copy_from_gguf, source_gguf, write_from_tokenizer
    from .plain import source_folder

    folder = source_folder(source_model) or source_folder(model)
    if tokenizer is None:
        found = source_gguf(folder)
        if found is not None and pre is None:
            return copy_from_gguf(writer, found, vocab_size)
        if folder is None:
            raise CheckpointError("save_gguf needs the tokenizer: the model was not loaded from a folder, so pass "
                                  "tokenizer=<a transformers tokenizer, its folder, or a .gguf to copy it from>")
        tokenizer = folder
    if isinstance(tokenizer, (str, Path)):
        if str(tokenizer).endswith(".gguf"):
            return copy_from_gguf(writer, Path(tokenizer), vocab_size)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return write_from_tokenizer(writer, tokenizer, vocab_size, pre)


def _modules(model: Any, cfg: Any) -> list[tuple[str, str, int | None]]:
    """(GGUF tensor prefix, module name, heads to permute rows for) of llama.cpp's graph for the model."""
    permute, extra = ARCHS[cfg.model_type]
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    out: list[tuple[str, str, int | None]] = [("token_embd", "model.embed_tokens", None)]
    for i in range(int(cfg.num_hidden_layers)):
        for short, long in BLOCK_NAMES + extra:
            heads = None if not permute else n_head if short == "attn_q" else n_kv if short == "attn_k" else None
            out.append((f"blk.{i}.{short}", f"model.layers.{i}.{long}", heads))
    out += [("output_norm", "model.norm", None), ("output", "lm_head", None)]
    return out


def _collect_tensors(model: Any, cfg: Any, float_kind: str) -> tuple[dict, list[GgufTensor]]:
    """Every tensor as (array, ggml type), checked before any byte is written."""
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    written: list[GgufTensor] = []
    covered: set[str] = set()
    embed = model.get_submodule("model.embed_tokens") if _has(model, "model.embed_tokens") else None
    with torch.no_grad():
        for prefix, name, heads in _modules(model, cfg):
            module = model.get_submodule(name) if _has(model, name) else stacked_rows(model, name)
            if module is None:
                raise CheckpointError(f"{name} is missing: llama.cpp's {cfg.model_type} graph needs {prefix}.weight")
            covered.add(name if not isinstance(module, RowSlice) else name.rpartition(".")[0] + ".gate_up")
            if prefix == "output" and _tied(module, embed):
                continue  # llama.cpp reads the tied head from token_embd
            perm = rope_rows(_rows(module), heads) if heads else None
            kind, data, ours, source = _convert(name, module, float_kind, prefix.endswith("norm"), perm)
            err = float(np.abs(dequantize_blocks(kind, data, ours.shape[1]) - ours.numpy()).max()) if ours.ndim == 2 \
                else float(np.abs(data.astype(np.float32) - ours.numpy()).max())
            arrays[f"{prefix}.weight"] = (data, kind)
            written.append(GgufTensor(f"{prefix}.weight", name, source, kind, err))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                b = bias.detach().float().cpu()
                b = b[perm] if perm is not None else b
                arrays[f"{prefix}.bias"] = (b.numpy().astype(np.float32), "F32")
                written.append(GgufTensor(f"{prefix}.bias", name, "bias", "F32", 0.0))
    stray = sorted({k.rsplit(".", 1)[0] for k in model.state_dict()} - covered)
    if stray:
        kind = type(model.get_submodule(stray[0])).__name__
        raise CheckpointError(f"{stray[0]} (a {kind}) has no place in llama.cpp's {cfg.model_type} graph"
                              f"{f' ({len(stray)} such modules)' if len(stray) > 1 else ''}; save_gguf cannot write it")
    return arrays, written


def _has(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _rows(module: Any) -> int:
    return int(getattr(module, "out_features", 0) or module.weight.shape[0])


def _tied(head: Any, embed: Any) -> bool:
    if type(head) is not nn.Linear or embed is None:
        return False
    a, b = head.weight, embed.weight
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape)


def _convert(name: str, module: Any, float_kind: str, is_norm: bool,
             perm: torch.Tensor | None) -> tuple[str, np.ndarray, torch.Tensor, str]:
    """(ggml type, data, our dequantized float32 weight in the written row order, our form)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[perm] if perm is not None else t

    form = int4_form(module)  # Int4Linear, fuse-kernels' and decode-engine's forms of it
    if form is not None:
        kind, data = int4_blocks(name, rows(form.codes), rows(form.scale), rows(form.zero), form.group_size,
                                 form.in_features)
        grid = "symmetric" if kind == "Q4_0" else "asymmetric"
        return kind, data, rows(form.weight), f"{form.label} g{form.group_size} {grid}"
    if isinstance(module, Int8Linear):
        kind, data = int8_blocks(name, rows(module.qweight.cpu()), rows(module.scale.cpu()))
        return kind, data, rows(module.dequantized_weight(torch.float32).cpu()), "int8 per channel"
    if isinstance(module, Int8Embedding):  # int8 rows: Q8_0 blocks, as an int8 head
        kind, data = int8_blocks(name, module.qweight.cpu(), module.scale.cpu())
        return kind, data, module.weight.cpu(), "int8 rows"
    plain = (nn.Linear, nn.Embedding)
    if type(module) in plain or (is_norm and type(module).__name__.endswith("RMSNorm")):
        w = rows(module.weight.detach().float().cpu())
        kind, data = float_tensor(name, w, "F32" if is_norm else float_kind)
        return kind, data, w, ("norm" if is_norm else type(module).__name__.lower() + f" {module.weight.dtype}")
    raise CheckpointError(f"{name} is a {type(module).__name__}, which has no GGUF tensor type llama.cpp runs (it "
                          "reads float F32/F16 and ggml blocks; save_gguf maps Int4Linear to Q4_0/Q4_1, Int8Linear and "
                          "Int8Embedding to Q8_0, nn.Linear/nn.Embedding to F16/F32)")
