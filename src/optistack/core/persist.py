"""Save an optimized model once, load it many times: safetensors + a JSON manifest, never pickle.

The manifest names the base architecture (a transformers model class + its config, or "user" when
the caller supplies a fresh instance at load time), the applied steps, every submodule the pipeline
replaced, and a SHA-256 of every file and of itself. A model that is no longer a torch module (an
ONNX Runtime session, a TensorRT engine) saves itself through `save_to` / `session_options` /
`load_from` (`core.hooks.SavableRuntime`); a replacement layer through `optistack_spec` (`SavableLayer`).

Loading (loading.py; `optistack.load_model` registers every loadable class first, see
checkpoints/loadables.py) trusts nothing in the folder: see docs/saving-and-loading.md. `save`
writes only what loading accepts: classes and specs registered in load_registry.py, file names
checksums.py calls safe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checksums import FORMAT, MANIFEST, WEIGHTS, write_manifest
from .errors import LoadError, OptistackError
from .hooks import SAVE_TO_ATTR, SESSION_OPTIONS_ATTR, SavableLayer
from .load_registry import MODULES, RUNTIMES, class_name, registered, spec_fields, transformers_model_names
from .load_schema import check_fields
from .loading import check_steps
from .modeling import unwrap_compiled
from .registry import get_pass_class

__all__ = ["FORMAT", "MANIFEST", "WEIGHTS", "save_model"]


def _module(model: Any) -> torch.nn.Module:
    module = unwrap_compiled(model)
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
        nx, nf = mod.get_parameter("weight").shape
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
                                 "weights and optistack.load_model cannot rebuild it at the new shape")
        if entry is None:
            key = registered(MODULES, mod)
            if key is None or not isinstance(mod, SavableLayer):
                raise OptistackError(
                    f"cannot save: module '{name}' became {type(mod).__module__}.{type(mod).__qualname__}, which "
                    "optistack.load_model cannot rebuild (loadable classes register with optistack.core.load_registry)")
            entry = {"class": key, "spec": mod.optistack_spec()}
        try:
            spec_fields(MODULES[entry["class"]], entry["spec"], f"replaced[{name!r}].spec")
        except LoadError as exc:
            raise OptistackError(f"cannot save: {exc} (update the schema its class registers with core.load_registry)") from None
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
        raise OptistackError(f"cannot save: {exc} (update the schema its class registers with core.load_registry)") from None
    out = _folder(out)
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
    if hasattr(model, SAVE_TO_ATTR) and hasattr(model, SESSION_OPTIONS_ATTR):
        return _save_runtime(Path(path), model, applied, workload)
    final, base = _module(model), _module(original)
    tensors, aliases = _plain_state(final)
    manifest: dict[str, Any] = {"format": FORMAT, "pipeline": ",".join(s.text for s in applied), "steps": _steps(applied),
                "base": _base_entry(base), "replaced": _replacements(base, final), "aliases": aliases,
                "workload": workload}
    try:  # steps that run again on load must be ones load accepts, or the folder would not load
        check_steps(manifest["steps"], reapply=True)
    except LoadError as exc:
        raise OptistackError(f"cannot save: {exc}") from None
    out = _folder(path)
    try:
        save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
        write_manifest(out, manifest, [WEIGHTS])
    except OSError as exc:
        raise OptistackError(f"cannot save to {str(out)!r}: {exc.strerror or exc}") from None
    return out


def _folder(path: Any) -> Path:
    """The folder to save into, made if missing; one OptistackError naming the path when it cannot be. A
    folder that already holds files is used only if it is an earlier save (its manifest): saving over the
    model folder it was loaded from (or any folder of the user's) would replace their files."""
    out = Path(path).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OptistackError(f"cannot save to {str(out)!r}: it exists, is not empty and is not an optistack save "
                             f"(no {MANIFEST}); choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "is a file, not a folder" if out.is_file() else (exc.strerror or str(exc))
        raise OptistackError(f"cannot save to {str(out)!r}: {what}") from None
    return out
