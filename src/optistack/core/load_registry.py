"""What `optistack.load_model` may rebuild, by exact name, and which keys and values each may take.

Nothing a manifest says is imported or called unless it is a key of a table below: replacement
modules (MODULES), runtime forms (RUNTIMES), transformers model classes (only names in transformers'
own auto-model mappings), and passes that run again on load (REAPPLY). Each entry names a fixed
module path, so a manifest can never reach another attribute. Adding a loadable class means adding
a line here, with the schema of its spec; `save` refuses a class that is not here, so a folder that
saves always loads.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from functools import lru_cache
from typing import Any, Callable, Mapping

from .errors import LoadError
from .load_schema import (
    Check,
    boolean,
    check_fields,
    choice,
    dtype_name,
    integer,
    list_of,
    number,
    optional,
    record,
    scalar_map,
    shape,
    short,
    text,
)


@dataclasses.dataclass(frozen=True)
class Loadable:
    module: str  # fixed import path
    attr: str
    fields: Mapping[str, Check]
    required: frozenset[str]
    build: Callable[[type, dict[str, Any]], Any] = lambda cls, spec: cls.from_optistack_spec(spec)

    def resolve(self) -> type:
        return getattr(importlib.import_module(self.module), self.attr)


def _all(fields: Mapping[str, Check], optional_keys: tuple[str, ...] = ()) -> frozenset[str]:
    return frozenset(k for k in fields if k not in optional_keys)


_FEATURES = integer(1, 1 << 24)
_BACKEND = choice("cpu-cpp", "triton", "cuda", "torch")
_FLOAT_DTYPE = choice("float32", "float16", "bfloat16", "float64")
_LINEAR = {"in_features": _FEATURES, "out_features": _FEATURES, "bias": boolean}
_CONV1D = {"nf": _FEATURES, "nx": _FEATURES}
_INT4 = {**_LINEAR, "group_size": integer(1, 1 << 20), "kernel": choice("cpu-int4pack", "cuda-int4pack", "dequant")}
_FP8 = {**_LINEAR, "mode": choice("weight-only", "dynamic"), "kernel": choice("emulated", "scaled_mm")}
_RMSNORM = {"hidden_size": _FEATURES, "eps": number(0.0, 1.0), "backend": _BACKEND, "dtype": _FLOAT_DTYPE}


def _buffers(v: Any) -> str | None:
    if type(v) is not dict or not 0 < len(v) <= 16:
        return f"must be an object of 1..16 packed buffers, got {short(v)}"
    for key, entry in v.items():
        if type(key) is not str or not key.isidentifier():
            return f"buffer name {short(key)} must be an identifier"
        if type(entry) is not list or len(entry) != 2 or shape(entry[0]) or dtype_name(entry[1]):
            return f"buffer {key!r} must be [shape, dtype name], got {short(entry)}"
    return None


_FUSED_INT4 = {**_LINEAR, "group_size": integer(1, 1 << 20), "packed_k": _FEATURES, "backend": _BACKEND,
               "layout": optional(text(128)), "buffers": _buffers}
_FUSED_LINEAR = {**_LINEAR, "dtype": _FLOAT_DTYPE}


def _fused_projection(v: Any) -> str | None:
    kind = v.get("kind") if type(v) is dict else None
    if kind == "int4":
        return record({"kind": choice("int4"), **_FUSED_INT4}, _all(_FUSED_INT4, ("layout",)))(v)
    if kind == "linear":
        return record({"kind": choice("linear"), **_FUSED_LINEAR}, _all(_FUSED_LINEAR))(v)
    return f"must be a projection spec with kind 'int4' or 'linear', got {short(v)}"


_FUSED_MLP = {"backend": _BACKEND, "gate_up": _fused_projection, "down": _fused_projection}

MODULES: dict[str, Loadable] = {
    "torch.nn.Linear": Loadable("torch.nn", "Linear", _LINEAR, _all(_LINEAR),
                                lambda cls, s: cls(s["in_features"], s["out_features"], bias=s["bias"])),
    "transformers.pytorch_utils:Conv1D": Loadable("transformers.pytorch_utils", "Conv1D", _CONV1D, _all(_CONV1D),
                                                  lambda cls, s: cls(s["nf"], s["nx"])),
    "optistack.passes.quant.int4_linear:Int4Linear": Loadable(
        "optistack.passes.quant.int4_linear", "Int4Linear", _INT4, _all(_INT4)),
    "optistack.passes.quant.fp8:Fp8Linear": Loadable("optistack.passes.quant.fp8", "Fp8Linear", _FP8, _all(_FP8)),
    "optistack.passes.quant.head:Int8Linear": Loadable("optistack.passes.quant.head", "Int8Linear", _LINEAR, _all(_LINEAR)),
    "optistack.kernels.modules:FusedRMSNorm": Loadable(
        "optistack.kernels.modules", "FusedRMSNorm", _RMSNORM, _all(_RMSNORM)),
    "optistack.kernels.modules:FusedInt4Linear": Loadable(
        "optistack.kernels.modules", "FusedInt4Linear", _FUSED_INT4, _all(_FUSED_INT4, ("layout",))),
    "optistack.kernels.modules:FusedGatedMLP": Loadable(
        "optistack.kernels.modules", "FusedGatedMLP", _FUSED_MLP, _all(_FUSED_MLP)),
}
# Folders saved before the kernels left `passes/` name the fused modules by their old path.
MODULES.update({f"optistack.passes.kernels.modules:{name}": MODULES[f"optistack.kernels.modules:{name}"]
                for name in ("FusedRMSNorm", "FusedInt4Linear", "FusedGatedMLP")})
# Folders saved before `quant/int4.py` was renamed `int4_linear.py` name Int4Linear by its old path; it
# loads from the new module (the old one is a deprecated alias that is never imported here).
MODULES["optistack.passes.quant.int4:Int4Linear"] = MODULES["optistack.passes.quant.int4_linear:Int4Linear"]


def _onnx_references(path: Any, name: str) -> list[str]:
    """Every external-data file an ONNX graph points to (initializers, subgraphs, functions); a graph
    carrying session options for ONNX Runtime (`ort_config` metadata) is refused."""
    try:
        import onnx
    except ImportError:
        raise LoadError("checking an ONNX graph's external data needs the onnx package: pip install onnx") from None
    proto = onnx.load(str(path), load_external_data=False)
    if any(p.key == "ort_config" for p in proto.metadata_props):  # session options ORT may take from the graph
        raise LoadError(f"{path.name}: the graph carries 'ort_config' metadata (session options, which could name "
                        "files to write); not loaded from a folder")
    found: list[str] = []

    def tensor(t: Any) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations = [e.value for e in t.external_data if e.key == "location"]
            found.extend(locations or ["<external tensor without a location>"])

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values), tensor(s.indices)
        nodes(g.node)

    def nodes(ns: Any) -> None:
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    graph(a.g)
                for g in a.graphs:
                    graph(g)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
    return list(dict.fromkeys(found))


@dataclasses.dataclass(frozen=True)
class RuntimeLoadable:
    module: str
    attr: str
    fields: Mapping[str, Check]
    required: frozenset[str]
    # (real path, manifest name) of the main file -> names of the other files it makes the runtime read
    references: Callable[[Any, str], list[str]] | None = None

    def resolve(self) -> type:
        return getattr(importlib.import_module(self.module), self.attr)


# Options an OrtModel is rebuilt with. Deliberately absent: `optimized_model_path` (ONNX Runtime
# would write the optimized graph there), `providers`, `keepalive`, `path`.
_ORT = {"intra_op_threads": integer(0, 4096), "inter_op_threads": integer(0, 4096),
        "execution_mode": choice("sequential", "parallel"),
        "graph_optimization": choice("disable", "basic", "extended", "all"), "spin": boolean,
        "provider": choice("auto", "cpu", "cuda", "tensorrt"), "meta": scalar_map()}
_ENGINE = {"output_names": list_of(text(1024), 4096)}
_OPENVINO = {"precision": choice("f32", "bf16", "f16"), "threads": integer(0, 4096),
             "hint": choice("latency", "throughput"), "pinning": boolean}


def _ir_references(path: Any, name: str) -> list[str]:
    """An OpenVINO IR graph (.xml) is read with the weights file of the same stem (.bin)."""
    import posixpath

    return [posixpath.splitext(posixpath.basename(name))[0] + ".bin"]


RUNTIMES: dict[str, RuntimeLoadable] = {
    "optistack.passes.export.session:OrtModel": RuntimeLoadable(
        "optistack.passes.export.session", "OrtModel", _ORT, frozenset(), _onnx_references),
    "optistack.passes.export.tensorrt:EngineModel": RuntimeLoadable(
        "optistack.passes.export.tensorrt", "EngineModel", _ENGINE, frozenset(_ENGINE)),
    "optistack.passes.export.openvino:OvModel": RuntimeLoadable(
        "optistack.passes.export.openvino", "OvModel", _OPENVINO, frozenset(), _ir_references),
}


def class_name(obj: Any) -> str:
    """The registry key of `obj`'s class ('torch.nn.Linear' for a plain Linear, else 'module:qualname')."""
    cls = type(obj)
    name = f"{cls.__module__}:{cls.__qualname__}"
    return "torch.nn.Linear" if name == "torch.nn.modules.linear:Linear" else name


def registered(table: Mapping[str, Any], obj: Any) -> str | None:
    """`obj`'s registry key when its class is exactly the class registered there, else None."""
    name = class_name(obj)
    entry = table.get(name)
    try:
        return name if entry is not None and entry.resolve() is type(obj) else None
    except Exception:
        return None


def lookup(table: Mapping[str, Any], name: Any, where: str) -> Any:
    """The entry registered under exactly `name`; anything else is refused by name."""
    if type(name) is not str or name not in table:
        allowed = ", ".join(sorted({e.attr for e in table.values()}))
        raise LoadError(f"{where}: {short(name)} is not a class optistack loads (allowed: {allowed}; "
                        "exact names in optistack/core/load_registry.py)")
    return table[name]


@lru_cache(maxsize=1)
def transformers_model_names() -> frozenset[str]:
    """Model class names in transformers' own auto mappings (the `*_MAPPING_NAMES` tables)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.endswith("_MAPPING_NAMES") and attr != "CONFIG_MAPPING_NAMES":
            for value in getattr(modeling_auto, attr).values():
                names.update([value] if isinstance(value, str) else [v for v in value if isinstance(v, str)])
    return frozenset(names)


def transformers_class(name: Any, where: str) -> type:
    if type(name) is not str or not name.isidentifier() or name not in transformers_model_names():
        raise LoadError(f"{where}: {short(name)} is not a transformers model class (only names in transformers' "
                        "auto-model mappings load, e.g. LlamaForCausalLM, BertModel)")
    if name.startswith("Timm"):  # timm builds from a model name it may fetch from the Hub ("hf-hub:...")
        raise LoadError(f"{where}: {name} is built by timm from a model name, which may be fetched; not loaded from a folder")
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, PreTrainedModel):
        raise LoadError(f"{where}: transformers {transformers.__version__} has no model class {name}; "
                        "install the transformers version the model was saved with")
    return cls


# Config keys that make transformers pick code at construction (attention/expert kernels, possibly
# fetched from the Hub) are never taken from a folder; set them on the loaded model if wanted.
_CODE_KEYS = frozenset({"attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                        "experts_implementation", "_experts_implementation", "_experts_implementation_internal"})


def check_config(cls: type, config: Any, where: str) -> dict[str, Any]:
    if type(config) is not dict:
        raise LoadError(f"{where}: must be an object (the model's config), got {short(config)}")
    want = getattr(cls.config_class, "model_type", "")
    if want and config.get("model_type") != want:
        raise LoadError(f"{where}.model_type: {cls.__name__} needs {want!r}, got {short(config.get('model_type'))}")
    defaults = set(cls.config_class().to_dict())

    def walk(node: Any, path: str, top: bool) -> None:
        if type(node) is dict:
            for key, value in node.items():
                if key in _CODE_KEYS:
                    raise LoadError(f"{path}.{key}: not read from a saved folder (it selects kernels that may be "
                                    "fetched and run); set it on the loaded model instead")
                if key.startswith("__"):
                    raise LoadError(f"{path}: key {short(key)} is not a config value")
                if top and key not in defaults and hasattr(type(inspect.getattr_static(cls.config_class, key, None)), "__set__"):
                    raise LoadError(f"{path}.{key}: a computed property of {cls.config_class.__name__}, not a saved value")
                walk(value, f"{path}.{key}", False)
        elif type(node) is list:
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]", False)

    walk(config, where, True)
    return config


def _no_draft(v: Any) -> str | None:
    return None if v is None else ("a draft model path is not followed from a saved folder; "
                                   "apply speculative{draft=...} after loading")


# Passes whose effect is not in tensors and that run again on load, with the values they may take then.
REAPPLY: dict[str, dict[str, Check]] = {
    "cast": {},
    "kv-cache": {},
    "speculative": {"draft": _no_draft},
    "attention": {"impl": choice("sdpa", "eager")},
    "compile": {"backend": choice("inductor", "eager", "aot_eager")},
    "decode-engine": {},  # numbers only, checked by its config; the engine is rebuilt from the loaded weights
}


def check_reapply(name: str, cls: type, config: dict[str, Any], where: str) -> None:
    if name not in REAPPLY or not cls.__module__.startswith("optistack.passes."):
        raise LoadError(f"{where}: pass '{name}' would run again on load, but only optistack's own "
                        f"{', '.join(sorted(REAPPLY))} are re-run from a saved folder")
    for key, check in REAPPLY[name].items():
        if key in config:
            why = check(config[key])
            if why:
                raise LoadError(f"{where}.config.{key}: {why}")


def spec_fields(entry: Loadable, spec: Any, where: str) -> dict[str, Any]:
    return check_fields(spec, entry.fields, entry.required, where, entry.attr)
