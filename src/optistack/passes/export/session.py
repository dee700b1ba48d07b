"""`OrtModel`: an ONNX Runtime session behind the torch model's calling convention.

Takes the same positional/keyword arguments as the module it was exported from (torch tensors, numpy
arrays or scalars), feeds them to the graph by input name (keyword arguments the graph has no input
for, e.g. an unused `token_type_ids`, are dropped), and returns torch tensors: one tensor when the
graph has one output, else a tuple in graph output order. `model_bytes()` is the size of the .onnx
file plus any external-data files beside it, for `bench/memory.py`.

Execution providers: `provider="auto"` takes TensorRT's, then CUDA's when onnxruntime-gpu offers them
and a GPU is visible, else the CPU one; `provider` names the one the session really uses.
`meta` carries facts about the source model (model_type, num_heads, hidden_size) for the fusions of
`ort-optimize`; `save_to(dir)` copies the graph and its external data for `optistack.load`.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from ...core.load_registry import register_runtime
from ...core.load_schema import boolean, choice, integer, scalar_map
from .graph_files import onnx_references

_NP_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
}


# What `session_options` writes and `load_from` takes back (the schema registered below checks their values)
_LOADED_OPTIONS = ("intra_op_threads", "inter_op_threads", "execution_mode", "graph_optimization", "spin", "provider",
                   "meta")


class OrtModel:
    """Callable wrapper of `onnxruntime.InferenceSession(path)`; keeps `keepalive` (e.g. a temp dir) alive."""

    device = torch.device("cpu")  # inputs are handed over on CPU (bench and workloads read this)

    def __init__(self, path: str, *, intra_op_threads: int = 0, inter_op_threads: int = 0,
                 execution_mode: str = "sequential", graph_optimization: str = "all",
                 providers: list[str] | None = None, keepalive: Any = None,
                 optimized_model_path: str | None = None, provider: str = "auto",
                 meta: dict[str, Any] | None = None, spin: bool = False) -> None:
        import onnxruntime as ort

        self.path = str(path)
        self.keepalive = keepalive
        self.intra_op_threads = int(intra_op_threads)
        self.graph_optimization = graph_optimization
        opts = ort.SessionOptions()
        self.inter_op_threads, self.execution_mode = int(inter_op_threads), execution_mode
        if self.intra_op_threads > 0:
            opts.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads > 0:
            opts.inter_op_num_threads = self.inter_op_threads
        # Spinning worker threads keep cores busy after a call returns: measured here, an idle
        # spinning session slowed the next torch call by 20% and other ORT sessions by 30%+, which
        # is exactly the interleaved A/B timing the benchmark does. Off unless asked for.
        self.spin = bool(spin)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if self.spin else "0")
        opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if execution_mode == "parallel"
                               else ort.ExecutionMode.ORT_SEQUENTIAL)
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        if optimized_model_path:
            opts.optimized_model_filepath = str(optimized_model_path)
        self.requested_provider = provider
        self.meta = dict(meta or {})
        if providers is None:
            providers = choose_providers(provider)
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)
        self.providers = list(self.session.get_providers())
        self.provider = self.providers[0] if self.providers else "unknown"
        self._inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        self.input_names = [n for n, _ in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feed_arrays(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The numpy arrays this graph would be fed for `model(*args, **kwargs)`, by input name."""
        return self._feed(args, kwargs)

    def dynamic_axes(self, name: str) -> tuple[bool, ...]:
        """Per axis of input `name`: True where the graph leaves the size open (symbolic or unknown)."""
        shape = next(i.shape for i in self.session.get_inputs() if i.name == name)
        return tuple(not isinstance(d, int) for d in shape)

    def session_options(self) -> dict[str, Any]:
        """What a reloaded copy needs to behave the same (threads, optimization level, provider)."""
        return {"intra_op_threads": self.intra_op_threads, "inter_op_threads": self.inter_op_threads,
                "execution_mode": self.execution_mode, "graph_optimization": self.graph_optimization,
                "spin": self.spin,
                "provider": self.requested_provider, "meta": self.meta}

    @classmethod
    def load_from(cls, folder: str, file: str, options: dict[str, Any]) -> "OrtModel":
        """The model `save_to` wrote, with the saved session options (`optistack.load`). Only the keys
        `session_options` writes are taken: never a path ONNX Runtime would write to, nor providers."""
        unknown = sorted(set(options) - set(_LOADED_OPTIONS))
        if unknown:
            raise ValueError(f"OrtModel: option(s) {', '.join(map(repr, unknown))} are not loaded from a saved folder "
                             f"(allowed: {', '.join(_LOADED_OPTIONS)})")
        return cls(os.path.join(folder, file), **{k: options[k] for k in _LOADED_OPTIONS if k in options})

    def save_to(self, folder: str) -> list[str]:
        """Copy the graph and every external-data file it references into `folder`; returns their names,
        the graph first. A reference that is not a plain relative name inside the graph's folder is refused."""
        from ...core.checksums import safe_name

        os.makedirs(folder, exist_ok=True)
        name = os.path.basename(self.path)
        shutil.copy2(self.path, os.path.join(folder, name))
        written = [name]
        for extra in self._external_files():
            why = safe_name(extra)
            if why:
                raise ValueError(f"OrtModel: cannot save {name}: its external data {why}")
            target = os.path.join(folder, *extra.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(os.path.dirname(self.path), *extra.split("/")), target)
            written.append(extra)
        return written

    def _external_files(self) -> list[str]:
        import onnx

        proto = onnx.load(self.path, load_external_data=False)
        found: list[str] = []
        for init in proto.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location" and entry.value not in found:
                    found.append(entry.value)
        return found

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
            base = os.path.dirname(self.path)
            total += sum(os.path.getsize(os.path.join(base, f)) for f in self._external_files()
                         if os.path.exists(os.path.join(base, f)))
        except Exception:
            pass
        return total

    def __repr__(self) -> str:
        return f"<OrtModel {os.path.basename(self.path)} on {self.provider}>"


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def choose_providers(provider: str) -> list[str]:
    """ORT provider list for `provider` (auto|cpu|cuda|tensorrt); a named one that is missing is an error."""
    import importlib.util

    import onnxruntime as ort

    have = ort.get_available_providers()
    if provider != "auto":
        want = PROVIDERS.get(provider)
        if want is None:
            raise ValueError(f"unknown ONNX Runtime provider {provider!r}; expected auto, {', '.join(PROVIDERS)}")
        if want not in have:
            hint = "pip install 'optistack[gpu]' (onnxruntime-gpu, never beside onnxruntime)" if provider != "cpu" else ""
            raise ValueError(f"ONNX Runtime here has no {want} (available: {', '.join(have)}); {hint}".rstrip("; "))
        return [want] + (["CPUExecutionProvider"] if want != "CPUExecutionProvider" else [])
    gpu = torch.cuda.is_available()
    chosen = []
    if gpu and "TensorrtExecutionProvider" in have and importlib.util.find_spec("tensorrt") is not None:
        chosen.append("TensorrtExecutionProvider")
    if gpu and "CUDAExecutionProvider" in have:
        chosen.append("CUDAExecutionProvider")
    return chosen + ["CPUExecutionProvider"]


def one_onnxruntime() -> "Any":
    """Not ok when onnxruntime and onnxruntime-gpu are both installed: they share the package
    directory, so whichever was installed last half-overwrote the other."""
    import importlib.metadata

    from ...core.requirements import Availability

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.distribution(dist)
            found.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(found) == 2:
        return Availability.no("onnxruntime and onnxruntime-gpu are both installed and overwrite each other; "
                               "pip uninstall -y onnxruntime onnxruntime-gpu, then install one: "
                               "'optistack[onnx]' (CPU) or 'optistack[gpu]'")
    return Availability.yes()


# Options an OrtModel is rebuilt with. Deliberately absent: `optimized_model_path` (ONNX Runtime
# would write the optimized graph there), `providers`, `keepalive`, `path`.
register_runtime(OrtModel, {
    "intra_op_threads": integer(0, 4096), "inter_op_threads": integer(0, 4096),
    "execution_mode": choice("sequential", "parallel"), "graph_optimization": choice("disable", "basic", "extended", "all"),
    "spin": boolean, "provider": choice("auto", "cpu", "cuda", "tensorrt"), "meta": scalar_map()},
    references=onnx_references)
