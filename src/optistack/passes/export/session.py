"""`OrtModel`: an ONNX Runtime session behind the torch model's calling convention.

Takes the same positional/keyword arguments as the module it was exported from (torch tensors, numpy
arrays or scalars), feeds them to the graph by input name (keyword arguments the graph has no input
for, e.g. an unused `token_type_ids`, are dropped), and returns torch tensors: one tensor when the
graph has one output, else a tuple in graph output order. `model_bytes()` is the size of the .onnx
file plus any external-data files beside it, for `bench/memory.py`.
"""
from __future__ import annotations

import os
from typing import Any

import torch

_NP_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
}


class OrtModel:
    """Callable wrapper of `onnxruntime.InferenceSession(path)`; keeps `keepalive` (e.g. a temp dir) alive."""

    device = torch.device("cpu")  # inputs are handed over on CPU (bench and workloads read this)

    def __init__(self, path: str, *, intra_op_threads: int = 0, graph_optimization: str = "all",
                 providers: list[str] | None = None, keepalive: Any = None,
                 optimized_model_path: str | None = None) -> None:
        import onnxruntime as ort

        self.path = str(path)
        self.keepalive = keepalive
        self.intra_op_threads = int(intra_op_threads)
        self.graph_optimization = graph_optimization
        opts = ort.SessionOptions()
        if self.intra_op_threads > 0:
            opts.intra_op_num_threads = self.intra_op_threads
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        if optimized_model_path:
            opts.optimized_model_filepath = str(optimized_model_path)
        if providers is None:
            providers = [p for p in ("CPUExecutionProvider",) if p in ort.get_available_providers()] or None
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)
        self.providers = list(self.session.get_providers())
        self.provider = self.providers[0] if self.providers else "unknown"
        self._inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        self.input_names = [n for n, _ in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _feed(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        import numpy as np

        feed: dict[str, Any] = {}
        types = dict(self._inputs)
        named = {k: v for k, v in kwargs.items() if k in types and v is not None}
        free = [n for n in self.input_names if n not in named]
        if len(args) > len(free):
            raise TypeError(f"OrtModel: got {len(args)} positional inputs, the graph has {len(free)} free inputs {free}")
        for name, value in list(zip(free, args)) + list(named.items()):
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value)
            want = _NP_TYPES.get(types[name])
            if want is not None and arr.dtype != want:
                arr = arr.astype(want)
            feed[name] = arr
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise TypeError(f"OrtModel: the ONNX graph needs input(s) {missing}; got {sorted(kwargs)} and {len(args)} positional")
        return feed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outs = self.session.run(None, self._feed(args, kwargs))
        tensors = tuple(torch.from_numpy(o) if hasattr(o, "dtype") else torch.as_tensor(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def model_bytes(self) -> int:
        """Bytes of the .onnx file and its external-data files (every file the graph references)."""
        total = os.path.getsize(self.path)
        try:
            import onnx

            proto = onnx.load(self.path, load_external_data=False)
            base = os.path.dirname(self.path)
            seen: set[str] = set()
            for init in proto.graph.initializer:
                for entry in init.external_data:
                    if entry.key == "location" and entry.value not in seen:
                        seen.add(entry.value)
                        loc = os.path.join(base, entry.value)
                        if os.path.exists(loc):
                            total += os.path.getsize(loc)
        except Exception:
            pass
        return total

    def __repr__(self) -> str:
        return f"<OrtModel {os.path.basename(self.path)} on {self.provider}>"
