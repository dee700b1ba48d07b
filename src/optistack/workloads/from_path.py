"""A workload for the user's own model: a Hugging Face folder, a GGUF file, or `module:factory`.

- Folder: config.json + *.safetensors (pickled .bin weights are refused: loading them could run code;
  `trust_remote_code` is never set). The task comes from `config.architectures` or `task=`.
- GGUF: converted once to a plain HF folder in the cache (see `bundled_models.gguf_dir`); a causal LM.
- `module:factory` (e.g. `mypkg.models:build`): the callable returns a Workload, a (model,
  example_inputs) pair, or a dict with `model` and `example_inputs` (and optionally `eval_fn`,
  `higher_is_better`, `eval_inputs`); it gets `data=` when it takes such a parameter. This runs the
  user's own code, by their explicit request; the current directory is importable, as with `python -m`.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..core.errors import WorkloadError
from ..core.quiet import quiet_import
from .data_files import read_data
from .tasks import CAUSAL_LM, ENCODER, IMAGE_CLS, SEQ_CLS, check_task, infer_task, read_config

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_VALID = ("a workload name (see `optistack workloads`), a Hugging Face model folder (config.json + "
          "*.safetensors), a .gguf file, or module:factory")


def looks_like_path(spec: str) -> bool:
    """Whether `spec` names a path or a factory rather than a registered workload."""
    return (os.sep in spec or spec.startswith(("~", ".")) or spec.lower().endswith(".gguf")
            or bool(_FACTORY.match(spec)) or Path(spec).exists())


def load_path(spec: str | Path, data: str | Path | None = None, task: str | None = None, **options: Any) -> Any:
    """The workload for `spec` (see the module docstring), scored on `data` when given."""
    check_task(task)
    text = str(spec)
    path = Path(text).expanduser()
    if not path.exists() and _FACTORY.match(text):
        return _from_factory(text, data, task, options)
    if not path.exists():
        raise WorkloadError(f"--model {text}: no such file or folder; expected {_VALID}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise WorkloadError(f"--model {text}: a file, but not a .gguf; expected {_VALID}")
        if task not in (None, CAUSAL_LM):
            raise WorkloadError(f"--model {text}: a GGUF file holds a causal LM; task '{task}' does not apply")
        from ..bundled_models import gguf_dir

        return load_folder(gguf_dir(path), data, CAUSAL_LM, model_id=f"{path.name} (GGUF, dequantized to fp32)",
                           **options)
    return load_folder(path, data, task, **options)


def load_folder(folder: Path, data: str | Path | None = None, task: str | None = None,
                model_id: str | None = None, **options: Any) -> Any:
    """The workload for a Hugging Face model folder."""
    folder = Path(folder)
    config = read_config(folder)
    if not any(folder.glob("*.safetensors")):
        bins = [p.name for p in folder.glob("*.bin")]
        hint = (f" ({', '.join(bins)} are pickled weights, which can run code when loaded: convert them with "
                "save_pretrained(folder, safe_serialization=True))") if bins else ""
        raise WorkloadError(f"{folder} has no *.safetensors weights{hint}")
    task = infer_task(config, folder, task)
    # read before the model, so a bad file fails fast (an image classifier reads its image folder itself)
    records = read_data(data) if data is not None and task != IMAGE_CLS else None
    model_id = model_id or str(folder)
    name = options.pop("name", folder.name or "model")
    auto = {CAUSAL_LM: "AutoModelForCausalLM", ENCODER: "AutoModel", SEQ_CLS: "AutoModelForSequenceClassification",
            IMAGE_CLS: "AutoModelForImageClassification"}[task]
    model = _from_pretrained(auto, folder, config)
    if task == IMAGE_CLS:
        from .classifier import image_classifier

        return image_classifier(model, _preprocessor("AutoImageProcessor", folder), data, name, model_id, **options)
    tokenizer = _preprocessor("AutoTokenizer", folder)
    if task == CAUSAL_LM:
        from .causal_lm import CausalLMWorkload

        return CausalLMWorkload(model, tokenizer, records, model_id=model_id, name=name, **options)
    if task == ENCODER:
        from .encoder import EncoderWorkload

        return EncoderWorkload(model, tokenizer, records, model_id=model_id, name=name, folder=folder, **options)
    from .classifier import text_classifier

    return text_classifier(model, tokenizer, records, name, model_id, **options)


def _transformers() -> Any:
    try:
        with quiet_import(hf_progress=True):
            import transformers
    except ImportError as exc:
        raise WorkloadError("loading a model folder needs transformers; pip install 'optistack[hf]'") from exc
    return transformers


def _from_pretrained(auto: str, folder: Path, config: dict[str, Any]) -> Any:
    transformers = _transformers()
    try:
        with quiet_import(hf_progress=True):
            model = getattr(transformers, auto).from_pretrained(folder, dtype="float32", trust_remote_code=False)
    except Exception as exc:
        custom = " (its config asks for custom code via auto_map, which optistack never runs)" if "auto_map" in config else ""
        raise WorkloadError(f"cannot load {folder} with transformers' {auto}{custom}: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    return model.eval()


def _preprocessor(auto: str, folder: Path) -> Any:
    transformers = _transformers()
    try:
        with quiet_import(hf_progress=True):
            return getattr(transformers, auto).from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        what = "tokenizer (tokenizer.json or the files its tokenizer_config.json names)" if auto == "AutoTokenizer" \
            else "image processor (preprocessor_config.json)"
        raise WorkloadError(f"{folder} has no usable {what}: {type(exc).__name__}: {exc}") from exc


def _from_factory(spec: str, data: Any, task: str | None, options: dict[str, Any]) -> Any:
    module_name, attr = spec.split(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkloadError(f"--model {spec}: cannot import module '{module_name}': {exc}") from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise WorkloadError(f"--model {spec}: module '{module_name}' has no callable '{attr}'")
    kwargs = {}
    params = inspect.signature(factory).parameters
    if data is not None:
        if "data" not in params:
            raise WorkloadError(f"--model {spec}: --data was given but {attr}() takes no 'data' parameter")
        kwargs["data"] = data
    if task is not None and "task" in params:
        kwargs["task"] = task
    made = factory(**kwargs)
    return _workload_of(made, spec, options)


def _workload_of(made: Any, spec: str, options: dict[str, Any]) -> Any:
    from ..core.workload import Workload
    from .generic import GenericWorkload

    if isinstance(made, Workload):
        return made
    if isinstance(made, dict) and "model" in made and "example_inputs" in made:
        return GenericWorkload(name=spec, **{**made, **options})
    if isinstance(made, (tuple, list)) and len(made) == 2:
        return GenericWorkload(made[0], made[1], name=spec, **options)
    raise WorkloadError(f"--model {spec}: the factory returned a {type(made).__name__}; expected a Workload, "
                        "a (model, example_inputs) pair, or a dict with 'model' and 'example_inputs'")
