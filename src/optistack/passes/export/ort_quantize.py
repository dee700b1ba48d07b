"""`ort-quantize`: int8 quantization of an exported graph with ONNX Runtime's quantization tool.

- `mode=dynamic`: `quantize_dynamic`: int8 weights, activations quantized per call (no calibration).
- `mode=static`: `quantize_static` in QDQ format: activation ranges calibrated on the workload's
  calibration inputs (never its evaluation data) with `calibration` = minmax | entropy | percentile.
- `per_channel`, `reduce_range`, `op_types` (e.g. `MatMul|Attention`), `exclude` (a regex on node names).
- `unpack_attention` (default on): a fused Attention node (ort-optimize) is rewritten as its QKV
  projection (a MatMul, quantized) + MultiHeadAttention, because ORT cannot quantize the fused node
  when it carries an additive mask; on MiniLM the projection is ~40% of the fused graph's time.
- `keep_fp32=N`: leave the N nodes whose quantization hurts most in fp32. Sensitivity of a node is the
  relative output error of the graph with only that node quantized, on the calibration inputs; the
  ranking is in `info["most_sensitive"]`. This is what turns ORT's plain recipe (cosine 0.963 on
  MiniLM) into one that keeps the embeddings: the few layers fed by outlier activations stay fp32.
Lossy: the accuracy gate decides whether to keep it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Any, Literal

from ...core.config import PassConfig, check, check_regex
from ...core.errors import PassApplyError
from ...core.pass_protocol import ONNX, ConfiguredPass, PassContext, PassResult
from ...core.quiet import quiet_import
from ...core.requirements import Availability, all_of, need_packages
from .onnx import _first_lines
from .ort import _need_ort_model, _session

_QOPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "QAttention", "DynamicQuantizeLinear",
         "QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat")
_BIG = 1_500_000_000


@dataclasses.dataclass(frozen=True)
class OrtQuantizeConfig(PassConfig):
    mode: Literal["dynamic", "static"] = "dynamic"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: str = "MatMul|Attention"
    exclude: str = ""
    keep_fp32: int = 0
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calib_batches: int = 4
    unpack_attention: bool = True

    def __post_init__(self) -> None:
        ops = [o for o in self.op_types.split("|") if o]
        check(bool(ops) and all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", o) for o in ops),
              f"ort-quantize: option 'op_types' must be ONNX op names joined by '|' (e.g. MatMul|Attention), "
              f"got {self.op_types!r}")
        check_regex("ort-quantize", "exclude", self.exclude)
        check(self.keep_fp32 >= 0, f"ort-quantize: option 'keep_fp32' must be >= 0, got {self.keep_fp32}")
        check(self.calib_batches >= 1, f"ort-quantize: option 'calib_batches' must be >= 1, got {self.calib_batches}")


class _Reader:
    """A CalibrationDataReader over the workload's calibration inputs, fed as the graph wants them."""

    def __init__(self, model: Any, inputs: list[Any]) -> None:
        from ...core.modeling import normalize_inputs

        self._feeds = [model.feed_arrays(*normalize_inputs(x)) for x in inputs]
        self._it = iter(self._feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def prepared_copy(src_path: str, folder: str, unpack: bool) -> tuple[str, Any, int]:
    """(path, graph, attention nodes unpacked): every node named (`exclude` and the sensitivity ranking
    address nodes by name) and, with `unpack`, fused Attention split so its projection quantizes."""
    import onnx

    from .fusions import unpack_attention

    proto = onnx.load(src_path, load_external_data=False)
    has_attention = any(n.op_type == "Attention" for n in proto.graph.node)
    if all(n.name for n in proto.graph.node) and not (unpack and has_attention):
        return src_path, proto.graph, 0
    proto = onnx.load(src_path)
    taken = {n.name for n in proto.graph.node}
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
    unpacked = unpack_attention(proto) if unpack else 0
    path = os.path.join(folder, "prepared.onnx")
    big = proto.ByteSize() > _BIG
    onnx.save(proto, path, save_as_external_data=big, location="prepared.onnx.data" if big else None)
    return path, proto.graph, unpacked


class OrtQuantizePass(ConfiguredPass):
    """Dynamic or static (QDQ) int8 for the chosen op types; sensitive nodes optionally left in fp32."""

    name = "ort-quantize"
    Config = OrtQuantizeConfig
    takes = frozenset({ONNX})
    gives = ONNX
    lossy = True

    def requirements(self) -> Availability:
        from .session import one_onnxruntime

        return all_of(need_packages("onnx", "onnxruntime", extra="onnx"), one_onnxruntime())

    def _quantize(self, src: str, dst: str, nodes: list[str] | None, excluded: list[str], reader: Any) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        cfg = self.config
        common = dict(op_types_to_quantize=[o for o in cfg.op_types.split("|") if o], per_channel=cfg.per_channel,
                      reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
                      nodes_to_quantize=nodes, nodes_to_exclude=excluded,
                      # fused com.microsoft ops (ort-optimize) defeat ONNX shape inference;
                      # their outputs are fp32, which is what the quantizer needs to know
                      extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                      use_external_data_format=os.path.getsize(src) > _BIG)
        if cfg.mode == "dynamic":
            with quiet_import():  # "consider pre-processing" on the root logger, every call
                quantize_dynamic(src, dst, **common)
        else:
            reader.rewind()
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[cfg.calibration]
            with quiet_import():
                quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                                calibrate_method=method, **common)

    def _sensitivity(self, src_model: Any, path: str, candidates: list[str], excluded: list[str], reader: Any,
                     feeds: list[dict], folder: str) -> list[tuple[str, float]]:
        """Relative output error of the graph with only each candidate quantized, worst first."""
        from .session import OrtModel

        refs = [src_model.session.run(None, f)[0] for f in feeds]
        scores = []
        for i, node in enumerate(candidates):
            out = os.path.join(folder, f"probe{i}.onnx")
            self._quantize(path, out, [node], excluded, reader)
            probe = OrtModel(out, intra_op_threads=src_model.intra_op_threads)
            err = sum(float(((probe.session.run(None, f)[0] - r) ** 2).sum() / max((r ** 2).sum(), 1e-30))
                      for f, r in zip(feeds, refs)) / len(feeds)
            scores.append((node, err ** 0.5))
            del probe
            for f in os.listdir(folder):
                if f.startswith(f"probe{i}."):
                    os.remove(os.path.join(folder, f))
        return sorted(scores, key=lambda s: -s[1])

    def apply(self, model: Any, ctx: PassContext) -> PassResult:
        import onnx

        src = _need_ort_model(model, self.name)
        cfg = self.config
        tmp = tempfile.TemporaryDirectory(prefix="optistack-ort-q-")
        out_path = os.path.join(tmp.name, "model.onnx")
        info: dict[str, Any] = {"mode": cfg.mode, "op_types": cfg.op_types}
        try:
            unpack = cfg.unpack_attention and "MatMul" in cfg.op_types.split("|")
            in_path, graph, unpacked = prepared_copy(src.path, tmp.name, unpack)
            if unpacked:
                info["unpacked_attention"] = unpacked
            excluded = [n.name for n in graph.node if cfg.exclude and re.search(cfg.exclude, n.name)]
            n_excluded = len(excluded)
            # quantize_dynamic rewrites a Gemm into a MatMul named "<gemm>_MatMul" before quantizing,
            # so an excluded Gemm needs that name excluded too.
            gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
            excluded += [f"{name}_MatMul" for name in excluded if name in gemms]
            wanted = set(cfg.op_types.split("|")) | ({"Gemm"} if "MatMul" in cfg.op_types.split("|") else set())
            candidates = [n.name for n in graph.node if n.op_type in wanted and n.name not in excluded]
            needs_data = cfg.mode == "static" or cfg.keep_fp32 > 0
            calib = ctx.calibration_inputs(cfg.calib_batches) if needs_data else []
            if needs_data and not calib:
                raise PassApplyError(f"ort-quantize: mode={cfg.mode}, keep_fp32={cfg.keep_fp32} need calibration "
                                     "inputs; the workload gives none (use mode=dynamic, keep_fp32=0)")
            reader = _Reader(src, calib) if calib else None
            if cfg.keep_fp32 and candidates:
                ranked = self._sensitivity(src, in_path, candidates, excluded, reader, reader._feeds, tmp.name)
                kept = [name for name, _ in ranked[: cfg.keep_fp32]]
                excluded += kept + [f"{name}_MatMul" for name in kept if name in gemms]
                info["kept_fp32"] = ",".join(kept)
                info["most_sensitive"] = ", ".join(f"{n}={e:.3g}" for n, e in ranked[: max(cfg.keep_fp32, 5)])
            self._quantize(in_path, out_path, None, excluded, reader)
        except PassApplyError:
            tmp.cleanup()
            raise
        except Exception as exc:
            tmp.cleanup()
            raise PassApplyError(f"ort-quantize: quantize_{cfg.mode} failed: "
                                 f"{type(exc).__name__}: {_first_lines(str(exc))}") from exc
        new = _session(self.name, tmp, out_path, tmp, src, intra_op_threads=src.intra_op_threads,
                       inter_op_threads=src.inter_op_threads, execution_mode=src.execution_mode,
                       graph_optimization=src.graph_optimization)
        qgraph = onnx.load(out_path, load_external_data=False).graph
        info.update({"candidates": len(candidates), "excluded": n_excluded})
        for op in _QOPS:
            count = sum(1 for n in qgraph.node if n.op_type == op)
            if count:
                info[f"nodes_{op}"] = count
        info.update({"file_bytes": new.model_bytes(), "file_bytes_before": src.model_bytes(), "provider": new.provider})
        if not candidates:
            return PassResult(new, modified=False,
                              info=info | {"reason": f"nothing to change: no {cfg.op_types} nodes to quantize"})
        return PassResult(new, modified=True, info=info)
