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
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    optimize_for_ort(model)
    # The fused Attention takes its packed QKV weight from a Concat of the three projections; fold it
    # into one initializer (past the folder's size limit: a Concat never grows data), or the
    # quantizer cannot see a constant weight and leaves attention in fp32.
    fold_constants(model, should_fold=lambda node: True if node.op_type == "Concat" else None)
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


def unpack_attention(proto: Any) -> int:
    """Rewrite fused `Attention` nodes as MatMul (the QKV projection) + Split + `MultiHeadAttention`.

    Numerically the same graph, but the projection, most of an Attention node's time, becomes a
    MatMul the int8 quantizer can take. ORT's quantizer turns Attention into QAttention only without
    `qkv_hidden_sizes` and without an additive attention bias (QAttention has no such input and would
    drop the padding mask), which is exactly what the dynamo graph's fused attention carries.
    Only nodes with a constant weight, no past state and no mask_index are rewritten; returns how many.
    """
    import numpy as np
    import onnx
    from onnx import helper

    graph = proto.graph
    weights = {init.name: init for init in graph.initializer}
    new_nodes, count = [], 0
    for node in graph.node:
        ins = list(node.input) + [""] * (6 - len(node.input))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        sizes = attrs.get("qkv_hidden_sizes")
        if (node.op_type != "Attention" or node.domain != "com.microsoft" or ins[1] not in weights
                or ins[3] or ins[4] or len(node.output) > 1 or attrs.get("unidirectional", 0)
                or (sizes is not None and len(set(sizes)) != 1)):
            new_nodes.append(node)
            continue
        width = weights[ins[1]].dims[1] // 3
        base = node.name or f"attention_{count}"
        qkv, q, k, v, split = (f"{base}/{s}" for s in ("qkv", "q", "k", "v", "split_sizes"))
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([width] * 3, dtype=np.int64), split))
        new_nodes.append(helper.make_node("MatMul", [ins[0], ins[1]], [qkv], name=f"{base}/MatMul"))
        new_nodes.append(helper.make_node("Split", [qkv, split], [q, k, v], name=f"{base}/Split", axis=-1))
        mha_attrs = {"num_heads": attrs["num_heads"]}
        if "scale" in attrs:
            mha_attrs["scale"] = attrs["scale"]
        new_nodes.append(helper.make_node("MultiHeadAttention", [q, k, v, ins[2], "", ins[5]], list(node.output),
                                          name=f"{base}/MultiHeadAttention", domain="com.microsoft", **mha_attrs))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return count
