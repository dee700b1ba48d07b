"""Save an optimized model once, load it many times: safetensors + a JSON manifest, never pickle.

The manifest names the base architecture (a transformers model class + its config, or "user" when
the caller supplies a fresh instance at load time), the applied steps, every submodule the pipeline
replaced, and a SHA-256 of every file and of itself. A model that is no longer a torch module (an
ONNX Runtime session, a TensorRT engine) saves itself through `save_to` / `session_options` /
`load_from`.

Loading trusts nothing in the folder (see docs/saving-and-loading.md): checksums first
(checksums.py), then only classes, spec keys and options named in load_registry.py, tensors checked
against the model on the meta device (load_tensors.py) before anything is allocated or filled. Every
refusal is one `LoadError` naming the file or manifest key; nothing the folder says is imported,
executed or written.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .checksums import FORMAT, MANIFEST, listed, read_manifest, verify_files, write_manifest
from .errors import LoadError, OptistackError
from .load_registry import (MODULES, RUNTIMES, check_config, check_reapply, class_name, lookup, registered,
                            spec_fields, transformers_class, transformers_model_names)
from .load_schema import check_fields, list_of, short, text
from .load_tensors import MAX_NON_PERSISTENT_BYTES, check_against, expected_state, non_persistent_bytes, read_header
from .pass_protocol import COMPILED, MODULE, PassContext
from .registry import get_pass_class

__all__ = ["FORMAT", "MANIFEST", "WEIGHTS", "save_model", "load_model"]
WEIGHTS = "model.safetensors"


def _module(model: Any) -> torch.nn.Module:
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise OptistackError(f"only torch modules can be saved this way; got {type(model).__name__}")
    return module


def _own_shapes(m: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(t.shape)) for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]]


def _shape_spec(mod: torch.nn.Module) -> dict[str, Any] | None:
    """Spec of a plain layer the registry rebuilds at any shape (a pruned Linear / Conv1D), else None."""
    name = class_name(mod)
    if name == "torch.nn.Linear" and registered(MODULES, mod):
        return {"class": name, "spec": {"in_features": mod.in_features, "out_features": mod.out_features,
                                        "bias": mod.bias is not None}}
    if name == "transformers.pytorch_utils:Conv1D" and registered(MODULES, mod):
        nx, nf = mod.weight.shape
        return {"class": name, "spec": {"nf": int(nf), "nx": int(nx)}}
    return None


def _replacements(original: torch.nn.Module, final: torch.nn.Module) -> dict[str, dict[str, Any]]:
    before = dict(original.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name, mod in final.named_modules():
        old = before.get(name)
        if old is not None and type(old) is type(mod) and _own_shapes(old) == _own_shapes(mod):
            continue
        entry = _shape_spec(mod)
        if entry is None and old is not None and type(old) is type(mod):
            raise OptistackError(f"cannot save: module '{name}' ({type(mod).__name__}) changed the shape of its "
                                 "weights and optistack.load cannot rebuild it at the new shape")
        if entry is None:
            key = registered(MODULES, mod)
            if key is None or not hasattr(mod, "optistack_spec"):
                raise OptistackError(
                    f"cannot save: module '{name}' became {type(mod).__module__}.{type(mod).__qualname__}, which "
                    "optistack.load cannot rebuild (loadable classes are listed in optistack/core/load_registry.py)")
            entry = {"class": key, "spec": mod.optistack_spec()}
        try:
            spec_fields(MODULES[entry["class"]], entry["spec"], f"replaced[{name!r}].spec")
        except LoadError as exc:
            raise OptistackError(f"cannot save: {exc} (update the schema in core/load_registry.py)") from None
        out[name] = entry
    return out


def _plain_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors stored once (tied embeddings) and their aliases recorded."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in module.state_dict().items():
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise OptistackError(
                f"cannot save: '{key}' is a {type(t).__name__} (a tensor subclass, e.g. from torchao int8 passes); "
                "save the model before those passes, or use passes with plain-tensor storage (rtn-int4, awq, fp8)")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    return tensors, aliases


def _base_entry(base: torch.nn.Module) -> dict[str, Any]:
    """A transformers model class by its exact name when load can rebuild it from its config, else 'user'."""
    cls, config = type(base), getattr(base, "config", None)
    if cls.__module__.startswith("transformers.") and config is not None and hasattr(config, "to_dict"):
        if cls.__name__ in transformers_model_names():
            return {"library": "transformers", "class": cls.__name__, "config": config.to_dict()}
    return {"library": "user", "class": f"{cls.__module__}:{cls.__qualname__}"}


def _steps(applied: list[Any]) -> list[dict[str, Any]]:
    return [{"pass": s.pass_name, "config": s.config, "info": s.info} for s in applied]


def _save_runtime(out: Path, model: Any, applied: list[Any], workload: dict[str, Any]) -> Path:
    """An exported model (ONNX / engine): its file(s) plus a manifest naming the class that reloads it."""
    key = registered(RUNTIMES, model)
    if key is None:
        raise OptistackError(f"cannot save a {type(model).__name__}: only optistack's runtime models save themselves "
                             f"({', '.join(sorted(RUNTIMES))})")
    entry = RUNTIMES[key]
    options = model.session_options()
    try:
        check_fields(options, entry.fields, entry.required, "runtime.options", entry.attr)
    except LoadError as exc:
        raise OptistackError(f"cannot save: {exc} (update the schema in core/load_registry.py)") from None
    out.mkdir(parents=True, exist_ok=True)
    written = model.save_to(str(out))
    files = [written] if isinstance(written, str) else list(written)
    manifest = {"format": FORMAT, "pipeline": ",".join(s.text for s in applied), "steps": _steps(applied),
                "runtime": {"class": key, "file": files[0], "options": options}, "workload": workload}
    write_manifest(out, manifest, files)
    return out


def save_model(path: str | Path, model: Any, original: Any, steps: list[Any], workload: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    applied = [s for s in steps if s.status == "applied"]
    for s in applied:
        why = getattr(get_pass_class(s.pass_name), "unsavable_reason", lambda info: None)(s.info)
        if why:
            raise OptistackError(f"cannot save: step '{s.text}' {why}")
    if hasattr(model, "save_to") and hasattr(model, "session_options"):
        return _save_runtime(Path(path), model, applied, workload)
    final, base = _module(model), _module(original)
    tensors, aliases = _plain_state(final)
    manifest = {"format": FORMAT, "pipeline": ",".join(s.text for s in applied), "steps": _steps(applied),
                "base": _base_entry(base), "replaced": _replacements(base, final), "aliases": aliases,
                "workload": workload}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    write_manifest(out, manifest, [WEIGHTS])
    return out


# ---------------------------------------------------------------------------------------------- load

def _one_line(exc: BaseException) -> str:
    text_ = " ".join(str(exc).split())
    return text_ if len(text_) <= 300 else text_[:297] + "..."


@contextlib.contextmanager
def _guard(where: str) -> Iterator[None]:
    """Any failure inside becomes one LoadError saying where it happened."""
    try:
        yield
    except LoadError:
        raise
    except OptistackError as exc:
        raise LoadError(f"{where}: {_one_line(exc)}") from exc
    except Exception as exc:  # whatever a rebuild raises is reported, never let through raw
        raise LoadError(f"{where}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _any(v: Any) -> str | None:
    return None


def _obj(v: Any) -> str | None:
    return None if type(v) is dict else f"must be an object, got {short(v)}"


def _module_name(v: Any) -> str | None:
    ok = type(v) is str and 0 < len(v) <= 1000 and all(v.split("."))
    return None if ok else f"must be a dotted submodule name, got {short(v)}"


def _name_map(v: Any) -> str | None:
    if type(v) is not dict or len(v) > 1 << 20:
        return f"must be an object, got {short(v)}"
    bad = next((k for k, x in v.items() if _module_name(k) or type(x) is not str), None)
    return None if bad is None else f"entry {short(bad)} must map a tensor name to a tensor name"


_STEP = {"pass": text(100), "config": _obj, "info": _any}
_COMMON = {"format": _any, "pipeline": text(100_000), "steps": list_of(_obj, 1000), "workload": _obj, "integrity": _any}
_MODULE_TOP = {**_COMMON, "base": _obj, "replaced": _obj, "aliases": _name_map}
_RUNTIME_TOP = {**_COMMON, "runtime": _obj}


def load_model(path: str | Path, model: torch.nn.Module | None = None) -> Any:
    """Rebuild a model saved by `RunResult.save`; outputs are bit-identical to the saved model's.
    Anything wrong with the folder is one `LoadError`; see docs/saving-and-loading.md for what is trusted."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise LoadError(f"model= must be a freshly built torch.nn.Module, got {type(model).__name__}")
    try:
        folder = Path(os.path.realpath(path))
        manifest = read_manifest(folder)
        files = verify_files(folder, manifest)
        if "runtime" in manifest:
            return _load_runtime(folder, manifest, files)
        return _load_module(manifest, files, model)
    except OptistackError as exc:
        raise LoadError(f"cannot load {path}: {_one_line(exc)}") from None
    except Exception as exc:  # the last net: nothing else escapes optistack.load
        raise LoadError(f"cannot load {path}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _load_runtime(folder: Path, manifest: dict[str, Any], files: dict[str, Path]) -> Any:
    import posixpath

    check_fields(manifest, _RUNTIME_TOP, set(_RUNTIME_TOP) - {"workload"}, MANIFEST)
    _check_steps(manifest["steps"], reapply=False)
    runtime = check_fields(manifest["runtime"], {"class": text(200), "file": text(1024), "options": _obj},
                           {"class", "file", "options"}, "runtime")
    entry = lookup(RUNTIMES, runtime["class"], "runtime.class")
    options = check_fields(runtime["options"], entry.fields, entry.required, "runtime.options", entry.attr)
    main = listed(files, runtime["file"], "runtime.file")
    if entry.references is not None:
        with _guard(f"{runtime['file']}: reading the graph"):
            refs = entry.references(main)
        base = posixpath.dirname(runtime["file"])
        for ref in refs:
            listed(files, posixpath.join(base, ref) if base else ref, f"{runtime['file']}: external data")
    with _guard(f"runtime.class {entry.attr}: rebuilding from {runtime['file']}"):
        return entry.resolve().load_from(str(folder), runtime["file"], dict(options))


def _check_steps(steps: list[dict[str, Any]], reapply: bool) -> list[tuple[type, dict[str, Any]]]:
    """The steps to run again on load, each checked against REAPPLY; the others are only validated."""
    out: list[tuple[type, dict[str, Any]]] = []
    form = MODULE
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        check_fields(step, _STEP, {"pass", "config"}, where)
        with _guard(f"{where}.pass"):
            cls = get_pass_class(step["pass"])
        again = getattr(cls, "reapply_on_load", False) or (getattr(cls, "gives", None) == COMPILED and form == MODULE)
        if reapply and again:
            check_reapply(step["pass"], cls, step["config"], where)
            with _guard(f"{where}.config"):
                cls(**step["config"])  # options checked by the pass's own config now, not half-way through
            out.append((cls, step["config"]))
        form = getattr(cls, "gives", None) or form
    return out


def _load_module(manifest: dict[str, Any], files: dict[str, Path], model: torch.nn.Module | None) -> Any:
    from safetensors.torch import load_file

    check_fields(manifest, _MODULE_TOP, set(_MODULE_TOP) - {"workload"}, MANIFEST)
    reapply = _check_steps(manifest["steps"], reapply=True)
    weights = listed(files, WEIGHTS, "integrity.files")
    header = read_header(weights, WEIGHTS)
    base = check_fields(manifest["base"], {"library": text(32), "class": text(300), "config": _obj},
                        {"library", "class"}, "base")
    build_base = None
    if model is None:
        if base["library"] != "transformers":
            raise LoadError(f"this model was saved from a user module ({short(base['class'])}); "
                            "pass a freshly built instance: optistack.load(path, model=MyModel(...))")
        cls = transformers_class(base["class"], "base.class")
        config = check_config(cls, base.get("config"), "base.config")

        def build_base() -> torch.nn.Module:
            with _guard(f"base: building {cls.__name__} from base.config"):
                return cls(cls.config_class.from_dict(_copy(config)))

        with torch.device("meta"):
            skeleton = build_base()
        extra = non_persistent_bytes(skeleton)
        if extra > MAX_NON_PERSISTENT_BYTES:
            raise LoadError(f"base.config: the model would hold {extra} bytes of buffers that {WEIGHTS} does not store")
    else:
        skeleton = model
    entries = _replacement_entries(manifest["replaced"])
    with torch.device("meta"):
        on_meta = [(name, _build(entry, spec, name)) for name, entry, spec in entries]
    check_against(expected_state(skeleton, on_meta), header, manifest["aliases"], WEIGHTS)
    # Everything is consistent: allocate for real. The caller's model is changed only from here on.
    real = [(name, _build(entry, spec, name)) for name, entry, spec in entries]
    with _guard(f"{WEIGHTS}: reading tensors"):
        state = load_file(str(weights))
    module = build_base().eval() if build_base is not None else model
    for name, replacement in real:
        module.set_submodule(name, replacement)
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    with _guard(f"{WEIGHTS}: filling the model"):
        module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    result: Any = module
    for pass_cls, options in reapply:
        with _guard(f"steps: re-applying '{pass_cls.name}'"):
            result = pass_cls(**options).apply(result, PassContext()).model
    return result


def _copy(config: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(config)


def _replacement_entries(replaced: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    out = []
    for name, raw in replaced.items():
        where = f"replaced[{short(name)}]"
        why = _module_name(name)
        if why:
            raise LoadError(f"{where}: {why}")
        item = check_fields(raw, {"class": text(300), "spec": _obj}, {"class", "spec"}, where)
        entry = lookup(MODULES, item["class"], f"{where}.class")
        out.append((name, entry, spec_fields(entry, item["spec"], f"{where}.spec")))
    return out


def _build(entry: Any, spec: dict[str, Any], name: str) -> torch.nn.Module:
    with _guard(f"replaced[{name!r}]: building {entry.attr}"):
        built = entry.build(entry.resolve(), dict(spec))
    if not isinstance(built, torch.nn.Module):
        raise LoadError(f"replaced[{name!r}]: {entry.attr} did not build a module")
    return built
