"""What `optistack.load_model` may rebuild, by exact name, and which keys and values each may take.

Nothing a manifest says is imported or called unless it is a key of a table here: replacement
modules (MODULES), runtime forms (RUNTIMES), transformers model classes (only names in transformers'
own auto-model mappings), and passes that run again on load (REAPPLY). Core knows only torch's and
transformers' plain layers; every optistack class is **registered from above**, by the module that
defines it, with the schema of its spec (`register_module`, `register_runtime`, `register_reapply`).
A class registers when its module is imported, so a model that holds one can always be saved; before
loading, `optistack.checkpoints.loadables` imports every registering module and names the classes'
old homes (`register_renamed`). `save` refuses a class that is not registered, so a folder that saves
always loads.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from functools import lru_cache
from typing import Any, Callable, Mapping

from .errors import LoadError
from .load_schema import Check, boolean, check_fields, integer, short


@dataclasses.dataclass(frozen=True)
class Loadable:
    module: str  # fixed import path
    attr: str
    fields: Mapping[str, Check]
    required: frozenset[str]
    build: Callable[[Any, dict[str, Any]], Any] = lambda cls, spec: cls.from_optistack_spec(spec)

    def resolve(self) -> type:
        cls: type = getattr(importlib.import_module(self.module), self.attr)
        return cls


@dataclasses.dataclass(frozen=True)
class RuntimeLoadable:
    module: str
    attr: str
    fields: Mapping[str, Check]
    required: frozenset[str]
    # (real path, manifest name) of the main file -> names of the other files it makes the runtime read
    references: Callable[[Any, str], list[str]] | None = None

    def resolve(self) -> type:
        cls: type = getattr(importlib.import_module(self.module), self.attr)
        return cls


def required_keys(fields: Mapping[str, Check], optional_keys: tuple[str, ...] = ()) -> frozenset[str]:
    return frozenset(k for k in fields if k not in optional_keys)


FEATURES = integer(1, 1 << 24)
LINEAR_FIELDS: Mapping[str, Check] = {"in_features": FEATURES, "out_features": FEATURES, "bias": boolean}
_CONV1D = {"nf": FEATURES, "nx": FEATURES}

MODULES: dict[str, Loadable] = {
    "torch.nn.Linear": Loadable("torch.nn", "Linear", LINEAR_FIELDS, required_keys(LINEAR_FIELDS),
                                lambda cls, s: cls(s["in_features"], s["out_features"], bias=s["bias"])),
    "transformers.pytorch_utils:Conv1D": Loadable("transformers.pytorch_utils", "Conv1D", _CONV1D, required_keys(_CONV1D),
                                                  lambda cls, s: cls(s["nf"], s["nx"])),
}
RUNTIMES: dict[str, RuntimeLoadable] = {}
# Passes whose effect is not in tensors and that run again on load: name -> (the class, checks of the
# values its options may take then).
REAPPLY: dict[str, tuple[Any, dict[str, Check]]] = {}  # (a pass class, checks)


def _key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _add(table: dict[str, Any], key: str, entry: Any) -> None:
    table[key] = entry  # a module imported again (importlib.reload) registers its new class


def register_module(cls: type, fields: Mapping[str, Check], optional_keys: tuple[str, ...] = (),
                    build: Callable[[Any, dict[str, Any]], Any] | None = None) -> None:
    """Let `load_model` rebuild `cls` (a `core.hooks.SavableLayer`) from a spec with these fields."""
    extra = {} if build is None else {"build": build}
    _add(MODULES, _key(cls), Loadable(cls.__module__, cls.__qualname__, dict(fields),
                                      required_keys(fields, optional_keys), **extra))


def register_runtime(cls: type, fields: Mapping[str, Check], required: tuple[str, ...] = (),
                     references: Callable[[Any, str], list[str]] | None = None) -> None:
    """Let `load_model` rebuild the runtime form `cls` (a `core.hooks.SavableRuntime`) with these options;
    `references(path, name)` names the other files its main file makes it read."""
    _add(RUNTIMES, _key(cls), RuntimeLoadable(cls.__module__, cls.__qualname__, dict(fields),
                                              frozenset(required), references))


def register_renamed(old: str, new: str) -> None:
    """A manifest naming a class by `old` (where an earlier version defined it) loads the class now
    registered as `new`."""
    table = MODULES if new in MODULES else RUNTIMES
    if new not in table:
        raise ValueError(f"{old} is renamed {new}, which is not registered")
    _add(table, old, table[new])


def register_reapply(pass_cls: Any, checks: Mapping[str, Check] | None = None) -> None:
    """`pass_cls` (its effect is not in tensors) runs again on load; `checks` limit the values its
    options may take then (its own config checks the rest)."""
    old = REAPPLY.get(pass_cls.name)
    if old is not None and _key(old[0]) != _key(pass_cls):
        raise ValueError(f"pass '{pass_cls.name}' is already registered to run again on load, by {_key(old[0])}")
    REAPPLY[pass_cls.name] = (pass_cls, dict(checks or {}))


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
                        "exact names registered with optistack.core.load_registry)")
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


def transformers_class(name: Any, where: str) -> Any:
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


def check_config(cls: Any, config: Any, where: str) -> dict[str, Any]:
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


def check_reapply(name: str, cls: type, config: dict[str, Any], where: str) -> None:
    entry = REAPPLY.get(name)
    if entry is None or entry[0] is not cls:
        raise LoadError(f"{where}: pass '{name}' would run again on load, but only optistack's own "
                        f"{', '.join(sorted(REAPPLY))} are re-run from a saved folder")
    for key, check in entry[1].items():
        if key in config:
            why = check(config[key])
            if why:
                raise LoadError(f"{where}.config.{key}: {why}")


def spec_fields(entry: Loadable, spec: Any, where: str) -> dict[str, Any]:
    return check_fields(spec, entry.fields, entry.required, where, entry.attr)
