"""Save an optimized model once, load it many times: safetensors + a JSON manifest, never pickle.

The manifest names the base architecture (a transformers class + its config, or "user" when the
caller supplies a fresh instance at load time), the applied steps, and every submodule the pipeline
replaced. Replacements are rebuilt only from an allowlist: optistack modules that implement
`optistack_spec()` / `from_optistack_spec(spec)`, and plain `torch.nn.Linear` (shrunk by pruning).
Passes whose effect lives outside tensors (hooks, compilation) set `reapply_on_load` and run again.

A model that is no longer a torch module (an ONNX Runtime session, a TensorRT engine) saves itself:
its class implements `save_to(folder) -> file name`, `session_options()` and the classmethod
`load_from(folder, file, options)`; the manifest names that class (optistack classes only) and
the file, and loading rebuilds the same runtime object with the same options.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import OptistackError
from .pass_protocol import COMPILED, MODULE, PassContext
from .registry import get_pass_class

FORMAT = "optistack.model/1"
MANIFEST = "optistack.json"
WEIGHTS = "model.safetensors"


def _module(model: Any) -> torch.nn.Module:
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise OptistackError(f"only torch modules can be saved this way; got {type(model).__name__}")
    return module


def _replacements(original: torch.nn.Module, final: torch.nn.Module) -> dict[str, dict[str, Any]]:
    before = dict(original.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name, mod in final.named_modules():
        old = before.get(name)
        same_type = old is not None and type(old) is type(mod)
        if isinstance(mod, torch.nn.Linear) and type(mod) is torch.nn.Linear:
            if same_type and old.weight.shape == mod.weight.shape:
                continue
            out[name] = {"class": "torch.nn.Linear", "spec": {
                "in_features": mod.in_features, "out_features": mod.out_features, "bias": mod.bias is not None}}
        elif not same_type:
            spec = getattr(mod, "optistack_spec", None)
            if spec is None:
                raise OptistackError(
                    f"cannot save: module '{name}' became {type(mod).__module__}.{type(mod).__qualname__}, which has "
                    "no safe serialization (optistack modules implement optistack_spec())")
            out[name] = {"class": f"{type(mod).__module__}:{type(mod).__qualname__}", "spec": spec()}
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


def _save_runtime(out: Path, model: Any, applied: list[Any], workload: dict[str, Any]) -> Path:
    """An exported model (ONNX / engine): its file(s) plus a manifest naming the class that reloads it."""
    cls = type(model)
    if not cls.__module__.startswith("optistack."):
        raise OptistackError(f"cannot save a {cls.__name__}: only optistack runtime models save themselves")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "pipeline": ",".join(s.text for s in applied),
        "steps": [{"pass": s.pass_name, "config": s.config, "info": s.info} for s in applied],
        "runtime": {"class": f"{cls.__module__}:{cls.__qualname__}", "file": model.save_to(str(out)),
                    "options": model.session_options()},
        "workload": workload,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
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
    config = getattr(base, "config", None)
    manifest = {
        "format": FORMAT,
        "pipeline": ",".join(s.text for s in applied),
        "steps": [{"pass": s.pass_name, "config": s.config, "info": s.info} for s in applied],
        "base": ({"library": "transformers", "class": type(base).__name__, "config": config.to_dict()}
                 if config is not None and hasattr(config, "to_dict") else
                 {"library": "user", "class": f"{type(base).__module__}:{type(base).__qualname__}"}),
        "replaced": _replacements(base, final),
        "aliases": aliases,
        "workload": workload,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def _base_model(base: dict[str, Any]) -> torch.nn.Module:
    if base["library"] != "transformers":
        raise OptistackError(f"this model was saved from a user module ({base['class']}); "
                             "pass a freshly built instance: optistack.load(path, model=MyModel(...))")
    import transformers

    cls = getattr(transformers, base["class"], None)
    if cls is None:
        raise OptistackError(f"transformers has no class {base['class']}; upgrade transformers to load this model")
    return cls(cls.config_class.from_dict(base["config"])).eval()


def _build_replacement(entry: dict[str, Any]) -> torch.nn.Module:
    if entry["class"] == "torch.nn.Linear":
        s = entry["spec"]
        return torch.nn.Linear(s["in_features"], s["out_features"], bias=s["bias"])
    module_name, _, qualname = entry["class"].partition(":")
    if not module_name.startswith("optistack."):
        raise OptistackError(f"refusing to build {entry['class']}: only optistack modules and torch.nn.Linear load")
    cls = getattr(importlib.import_module(module_name), qualname)
    return cls.from_optistack_spec(entry["spec"])


def load_model(path: str | Path, model: torch.nn.Module | None = None) -> Any:
    """Rebuild a model saved by `RunResult.save`; outputs are bit-identical to the saved model's."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise OptistackError(f"{folder} holds no {MANIFEST}: not a model saved by optistack") from None
    if manifest.get("format") != FORMAT:
        raise OptistackError(f"{folder}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    if "runtime" in manifest:
        runtime = manifest["runtime"]
        module_name, _, qualname = runtime["class"].partition(":")
        if not module_name.startswith("optistack."):
            raise OptistackError(f"refusing to load {runtime['class']}: only optistack runtime models load")
        cls = getattr(importlib.import_module(module_name), qualname)
        return cls.load_from(str(folder), runtime["file"], runtime["options"])
    module = model if model is not None else _base_model(manifest["base"])
    for name, entry in manifest["replaced"].items():
        module.set_submodule(name, _build_replacement(entry))
    state = load_file(str(folder / WEIGHTS))
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    result: Any = module
    form = MODULE
    for step in manifest["steps"]:
        p = get_pass_class(step["pass"])(**step["config"])
        if getattr(p, "reapply_on_load", False) or (p.gives == COMPILED and form == MODULE):
            result = p.apply(result, PassContext()).model
        form = p.gives or form
    return result
