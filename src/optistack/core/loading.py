"""`optistack.load_model`: rebuild a saved model, trusting nothing in the folder (docs/saving-and-loading.md).

Checksums first (checksums.py), then only classes, spec keys and options registered in load_registry.py,
then the weights checked against the model built on the meta device (load_tensors.py) before anything
is allocated or filled. Every refusal is one `LoadError` naming the file or manifest key; nothing the
folder says is imported, executed or written.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .checksums import MANIFEST, WEIGHTS, listed, read_manifest, verify_files
from .errors import LoadError, OptistackError
from .heap import release_free_memory
from .load_registry import MODULES, RUNTIMES, check_config, check_reapply, lookup, spec_fields, transformers_class
from .load_schema import check_fields, list_of, short, text
from .load_tensors import MAX_NON_PERSISTENT_BYTES, check_against, expected_state, non_persistent_bytes, read_header, read_tensors
from .pass_protocol import COMPILED, MODULE, PassContext
from .registry import get_pass_class
from .weightless import weightless_replacement, weightless_transformers


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
    except Exception as exc:  # the last net: nothing else escapes optistack.load_model
        raise LoadError(f"cannot load {path}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _load_runtime(folder: Path, manifest: dict[str, Any], files: dict[str, Path]) -> Any:
    import posixpath

    check_fields(manifest, _RUNTIME_TOP, set(_RUNTIME_TOP) - {"workload"}, MANIFEST)
    check_steps(manifest["steps"], reapply=False)
    runtime = check_fields(manifest["runtime"], {"class": text(200), "file": text(1024), "options": _obj},
                           {"class", "file", "options"}, "runtime")
    entry = lookup(RUNTIMES, runtime["class"], "runtime.class")
    options = check_fields(runtime["options"], entry.fields, entry.required, "runtime.options", entry.attr)
    main = listed(files, runtime["file"], "runtime.file")
    if entry.references is not None:
        with _guard(f"{runtime['file']}: reading the graph"):
            refs = entry.references(main, runtime["file"])
        base = posixpath.dirname(runtime["file"])
        for ref in refs:
            listed(files, posixpath.join(base, ref) if base else ref, f"{runtime['file']}: external data")
    with _guard(f"runtime.class {entry.attr}: rebuilding from {runtime['file']}"):
        return entry.resolve().load_from(str(folder), runtime["file"], dict(options))


def check_steps(steps: list[dict[str, Any]], reapply: bool) -> list[tuple[Any, dict[str, Any]]]:
    """The steps to run again on load, each checked against REAPPLY; the others are only validated."""
    out: list[tuple[Any, dict[str, Any]]] = []
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
    check_fields(manifest, _MODULE_TOP, set(_MODULE_TOP) - {"workload"}, MANIFEST)
    reapply = check_steps(manifest["steps"], reapply=True)
    weights = listed(files, WEIGHTS, "integrity.files")
    header = read_header(weights, WEIGHTS)
    base = check_fields(manifest["base"], {"library": text(32), "class": text(300), "config": _obj},
                        {"library", "class"}, "base")
    build_base = None
    if model is None:
        if base["library"] != "transformers":
            raise LoadError(f"this model was saved from a user module ({short(base['class'])}); "
                            "pass a freshly built instance: optistack.load_model(path, model=MyModel(...))")
        cls: Any = transformers_class(base["class"], "base.class")
        config = check_config(cls, base.get("config"), "base.config")

        def build_base() -> torch.nn.Module:
            with _guard(f"base: building {cls.__name__} from base.config"):
                built: torch.nn.Module = cls(cls.config_class.from_dict(_copy(config)))
                return built

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
    # Everything is consistent: allocate for real. The caller's model is changed only from here on. What the
    # file fills by assignment stays on meta until then (weightless.py): no weight is allocated twice.
    real = [(name, meta if weightless_replacement(meta) else _build(entry, spec, name))
            for (name, meta), (_, entry, spec) in zip(on_meta, entries)]
    with _guard(f"{WEIGHTS}: reading tensors"):
        state = read_tensors(weights, WEIGHTS)
    module = model
    if build_base is not None:
        with _guard("base: building it without its weights"):
            module, _ = weightless_transformers(build_base)
        module = (module if module is not None else build_base()).eval()
    for name, replacement in real:
        module.set_submodule(name, replacement)
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    with _guard(f"{WEIGHTS}: filling the model"):
        module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise LoadError(f"{WEIGHTS}: nothing filled {', '.join(left[:3])} (built without weights, not in the file)")
    module.eval()
    del state, real, on_meta  # a step below that repacks a tensor frees the file's copy as it goes
    result: Any = module
    for pass_cls, options in reapply:
        with _guard(f"steps: re-applying '{pass_cls.name}'"):
            result = pass_cls(**options).apply(result, PassContext()).model
    if reapply:  # a step that repacked freed the file's copy in pieces the heap would keep resident
        release_free_memory()
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
