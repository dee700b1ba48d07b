"""Integrity of a saved folder: safe file names, a SHA-256 of every file and of the manifest itself.

Save writes `integrity = {"manifest_sha256": ..., "files": {name: {"sha256", "bytes"}}}` into the
manifest. Load checks all of it before any other byte is parsed: the manifest's own digest (over its
canonical JSON without that one field), then each listed file — a plain relative name, inside the
folder once links are resolved, a regular file of the recorded size and hash. Files on disk that the
manifest does not list are never read. A checksum catches corruption and naive edits; a deliberate
edit can recompute it, which is why everything after this step also trusts nothing (load_registry.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import LoadError
from .load_schema import check_fields, integer, short

FORMAT = "optistack.model/2"
OLD_FORMATS = ("optistack.model/1",)  # saved before checksums existed
MANIFEST = "optistack.json"
WEIGHTS = "model.safetensors"  # a torch model's tensors (an exported model names its own files)
MAX_MANIFEST_BYTES = 64 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def safe_name(name: Any) -> str | None:
    """What is wrong with `name` as a file inside a saved folder, or None: relative, '/'-separated,
    no '.', '..' or empty parts, no backslash, colon or NUL, and not the manifest itself."""
    if type(name) is not str or not name or len(name) > 1024:
        return f"file name {short(name)} must be a non-empty string"
    if name.startswith("/") or any(ch in name for ch in "\\:\x00"):
        return f"file name {short(name)} must be a plain relative name (no absolute path, backslash or colon)"
    parts = name.split("/")
    if any(p in ("", ".", "..") or len(p) > 255 for p in parts):
        return f"file name {short(name)} must not contain '..', '.' or empty parts"
    if name == MANIFEST:
        return f"file name {short(name)} is the manifest itself"
    return None


def inside(folder: Path, name: str, what: str) -> Path:
    """The real path of `folder/name`, refused unless it is a regular file inside the real folder."""
    why = safe_name(name)
    if why:
        raise LoadError(f"{what}: {why}")
    path = folder / name
    if not os.path.lexists(path):
        raise LoadError(f"{what}: file '{name}' is missing from {folder}")
    real = Path(os.path.realpath(path))
    if real != folder and folder not in real.parents:
        raise LoadError(f"{what}: '{name}' is a link pointing outside {folder} (to {real})")
    if not real.is_file():
        raise LoadError(f"{what}: '{name}' is not a regular file")
    return real


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, without the field that holds this digest."""
    body = dict(manifest)
    integrity = dict(body.get("integrity") or {})
    integrity.pop("manifest_sha256", None)
    body["integrity"] = integrity
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """Hash every file in `files` (already written), then write the manifest atomically, last."""
    listed: dict[str, Any] = {}
    for name in files:
        why = safe_name(name)
        if why:
            raise LoadError(f"cannot save: {why}")
        listed[name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    body = json.loads(json.dumps({**manifest, "integrity": {"files": listed}}, default=str))
    body["integrity"]["manifest_sha256"] = manifest_digest(body)
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, folder / MANIFEST)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key)}")
        out[key] = value
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest, after its format and its own digest are checked (`folder`: a resolved path)."""
    if not folder.is_dir():
        raise LoadError(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    if not os.path.lexists(folder / MANIFEST):
        raise LoadError(f"{folder} holds no {MANIFEST}: not a model saved by optistack")
    real = Path(os.path.realpath(folder / MANIFEST))
    if real.parent != folder or not real.is_file():
        raise LoadError(f"{MANIFEST}: must be a regular file in {folder}, not a link or folder")
    if real.stat().st_size > MAX_MANIFEST_BYTES:
        raise LoadError(f"{MANIFEST}: {real.stat().st_size} bytes, more than a manifest ever holds ({MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(real.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise LoadError(f"{MANIFEST}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise LoadError(f"{MANIFEST}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise LoadError(f"{MANIFEST}: not valid JSON ({type(exc).__name__}: {short(str(exc), 100)})") from None
    if type(manifest) is not dict:
        raise LoadError(f"{MANIFEST}: must hold a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt in OLD_FORMATS:
        raise LoadError(f"{MANIFEST}: format {fmt} was saved without checksums by an older optistack; "
                        "re-run the pipeline and save it again to load it")
    if fmt != FORMAT:
        raise LoadError(f"{MANIFEST}: format {short(fmt)} is not one this optistack reads (expected {FORMAT!r})")
    if "integrity" not in manifest:
        raise LoadError(f"{MANIFEST}: no 'integrity' checksums; re-run the pipeline and save it again")
    check_fields(manifest["integrity"], {"manifest_sha256": _hex64, "files": _file_table}, {"manifest_sha256", "files"},
                 "integrity")
    if manifest_digest(manifest) != manifest["integrity"]["manifest_sha256"]:
        raise LoadError(f"{MANIFEST}: checksum mismatch (integrity.manifest_sha256): the manifest was changed after saving")
    return manifest


def _hex64(v: Any) -> str | None:
    return None if type(v) is str and _HEX64.match(v) else f"must be 64 lowercase hex digits, got {short(v)}"


def _file_table(v: Any) -> str | None:
    if type(v) is not dict or not 0 < len(v) <= 10000:
        return f"must be an object listing 1..10000 files, got {short(v)}"
    for name, entry in v.items():
        why = safe_name(name)
        if why:
            return why
        try:
            check_fields(entry, {"sha256": _hex64, "bytes": integer(0, 1 << 50)}, {"sha256", "bytes"}, name)
        except LoadError as exc:
            return str(exc)
    return None


def verify_files(folder: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Every listed file present inside `folder`, of the recorded size and SHA-256: name -> real path."""
    out: dict[str, Path] = {}
    for name, entry in manifest["integrity"]["files"].items():
        where = f"integrity.files[{name!r}]"
        real = inside(folder, name, where)
        size = real.stat().st_size
        if size != entry["bytes"]:
            raise LoadError(f"{name}: {size} bytes, the manifest recorded {entry['bytes']} (truncated or replaced; {where})")
        if sha256_file(real) != entry["sha256"]:
            raise LoadError(f"{name}: checksum mismatch ({where}.sha256): the file changed after saving")
        out[name] = real
    return out


def listed(files: dict[str, Path], name: Any, where: str) -> Path:
    """The verified path of a file the manifest refers to at `where`; refused when not in integrity.files."""
    why = safe_name(name)
    if why:
        raise LoadError(f"{where}: {why}")
    if name not in files:
        raise LoadError(f"{where}: '{name}' is not one of the checksummed files (integrity.files)")
    return files[name]
