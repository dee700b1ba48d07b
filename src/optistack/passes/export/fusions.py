"""Transformer fusions for an exported graph: two fusers, because each recognizes one exporter's output.

- `onnxscript` (`onnxscript.rewriter.ort_fusions.optimize_for_ort`) matches what the dynamo exporter
  writes (scaled_dot_product_attention, RMS/LayerNorm, GELU, rotary) and fuses it into ONNX Runtime's
  contrib ops (Attention, MultiHeadAttention, SkipLayerNormalization, BiasGelu, ...).
- `ort` (`onnxruntime.transformers.optimizer.optimize_model`) matches the TorchScript (legacy)
  exporter's BERT patterns; it needs the head count and hidden size, taken from the source model.
`auto` runs the first and falls back to the second when no attention was fused, keeping the result
with more fused attention nodes. Neither changes numerics beyond float reassociation; the pass that
calls this checks the result against its input.
"""
from __future__ import annotations

import collections
import os
from typing import Any

_FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization",
          "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "EmbedLayerNormalization",
          "BiasGelu", "FastGelu", "Gelu", "RotaryEmbedding", "LayerNormalization")
_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
_ORT_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert",
                    "electra": "bert", "gpt2": "gpt2", "bart": "bart", "t5": "t5"}
_BIG = 1_500_000_000


def op_counts(path: str) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def _with_onnxscript(src: str, dst: str) -> None:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    optimize_for_ort(model)
    big = os.path.getsize(src) > _BIG or any(os.path.exists(os.path.join(os.path.dirname(src), f))
                                             for f in os.listdir(os.path.dirname(src)) if f.endswith(".data"))
    ir.save(model, dst, external_data=os.path.basename(dst) + ".data" if big else None)


def _with_ort(src: str, dst: str, meta: dict[str, Any]) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _ORT_MODEL_TYPES.get(str(meta.get("model_type", "bert")), "bert")
    # opt_level=0: only the Python fusions here; ORT's own graph optimizations run in the session.
    opt = optimize_model(src, model_type=model_type, num_heads=int(meta.get("num_heads", 0) or 0),
                         hidden_size=int(meta.get("hidden_size", 0) or 0), opt_level=0)
    opt.save_model_to_file(dst, use_external_data_format=os.path.getsize(src) > _BIG)


def fuse_transformer(src: str, dst: str, mode: str, meta: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Fuse `src` into `dst` with `mode` (auto|onnxscript|ort); (wrote dst, facts for the report)."""
    before = op_counts(src)
    tried = ["onnxscript", "ort"] if mode == "auto" else [mode]
    best: tuple[int, str, collections.Counter] | None = None
    notes: list[str] = []
    for fuser in tried:
        out = dst if best is None else dst + f".{fuser}.onnx"
        try:
            _with_onnxscript(src, out) if fuser == "onnxscript" else _with_ort(src, out, meta)
        except Exception as exc:  # a fuser that cannot handle this graph is a note, not a failure
            notes.append(f"{fuser}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        after = op_counts(out)
        attention = sum(after[op] for op in _ATTENTION)
        if best is None or attention > best[0]:
            if out != dst:
                os.replace(out, dst)
                if os.path.exists(out + ".data"):
                    os.replace(out + ".data", dst + ".data")
            best = (attention, fuser, after)
        if attention:
            break
    facts: dict[str, Any] = {}
    if notes:
        facts["fusion_notes"] = " | ".join(notes)
    if best is None:
        facts["fusions"] = "none (every fuser failed)"
        return False, facts
    _, fuser, after = best
    facts["fuser"] = fuser
    for op in _FUSED:
        gained = after[op] - before[op]
        if gained > 0:
            facts[f"fused_{op}"] = gained
    if not any(k.startswith("fused_") for k in facts):
        facts["fusions"] = "no transformer pattern recognized"
    return True, facts
