"""The weights file against the model it must fill: every tensor named, shaped and typed as expected.

The safetensors header is read and checked here first (so a truncated or inconsistent file is one clear
error), then compared with the state the rebuilt model will have — computed on the meta device, so a
tampered config or spec cannot make load allocate more than the file holds. Only then is anything
allocated and filled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import LoadError
from .load_schema import check_fields, choice, shape, short

MAX_HEADER_BYTES = 100 << 20
MAX_NON_PERSISTENT_BYTES = 256 << 20  # buffers a config sizes that no file holds (e.g. rotary tables)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}

Layout = tuple[tuple[int, ...], torch.dtype]


def _offsets(v: Any) -> str | None:
    ok = type(v) is list and len(v) == 2 and all(type(x) is int and x >= 0 for x in v) and v[0] <= v[1]
    return None if ok else f"must be [begin, end] byte offsets, got {short(v)}"


def _metadata(v: Any) -> str | None:
    ok = type(v) is dict and all(type(k) is str and type(x) is str for k, x in v.items())
    return None if ok else "must be an object of strings"


def read_header(path: Path, name: str) -> dict[str, Layout]:
    """tensor name -> (shape, dtype) from a safetensors file, refusing any inconsistency."""
    return {key: layout for key, (layout, _) in _checked_header(path, name).items()}


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each read into memory of its own (no mapping of the file).

    Why not safetensors' `load_file`: its tensors are views of one private mapping of the whole file, so
    the pages a later step reads and replaces (the decode engine repacks the int4 projections) stay
    resident for as long as any one tensor of the file lives (a 1.1B Llama loaded: 520 MB of the file
    mapped, ~0.2 GB of it dead)."""
    header = _checked_header(path, name)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for key, ((dims, dtype), (begin, end)) in header.items():
            t = torch.empty(dims, dtype=dtype)
            view = t.view(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
            f.seek(start + begin)
            got = 0
            while got < end - begin:
                n = f.readinto(view[got:])
                if not n:
                    raise LoadError(f"{name}: the file ended inside tensor {short(key)}")
                got += n
            out[key] = t
    return out


def _checked_header(path: Path, name: str) -> dict[str, tuple[Layout, tuple[int, int]]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{name}: truncated safetensors header (the file has {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise LoadError(f"{name}: truncated safetensors header (it says {n} bytes, the file has {size - 8} after it)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise LoadError(f"{name}: safetensors header is not valid JSON ({short(str(exc), 80)})") from None
    if type(header) is not dict:
        raise LoadError(f"{name}: safetensors header must be a JSON object")
    data = size - 8 - n
    out: dict[str, tuple[Layout, tuple[int, int]]] = {}
    fields = {"dtype": choice(*_DTYPES), "shape": shape, "data_offsets": _offsets}
    for key, entry in header.items():
        if key == "__metadata__":
            why = _metadata(entry)
            if why:
                raise LoadError(f"{name}: header __metadata__ {why}")
            continue
        check_fields(entry, fields, set(fields), f"{name}: tensor {short(key)}")
        dims, dtype = tuple(entry["shape"]), _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        numel = 1
        for d in dims:
            numel *= d
        if end > data or end - begin != numel * dtype.itemsize:
            raise LoadError(f"{name}: tensor {short(key)} has byte range {begin}..{end}, which does not fit its shape "
                            f"{list(dims)} {entry['dtype']} in the file's {data} data bytes")
        out[key] = ((dims, dtype), (begin, end))
    return out


def non_persistent_bytes(module: torch.nn.Module) -> int:
    names = set(module.state_dict(keep_vars=True))
    return sum(b.numel() * b.element_size() for n, b in module.named_buffers(remove_duplicate=False) if n not in names)


def expected_state(base: torch.nn.Module, replacements: list[tuple[str, torch.nn.Module]]) -> dict[str, Layout]:
    """The state dict layout of `base` once each (name, module) replacement is set in order, without
    touching `base`."""
    state = {k: (tuple(t.shape), t.dtype) for k, t in base.state_dict(keep_vars=True).items()}
    modules = {n for n, _ in base.named_modules(remove_duplicate=False)}
    for name, mod in replacements:
        where = f"replaced[{name!r}]"
        if name not in modules:
            raise LoadError(f"{where}: the base model has no submodule '{name}'")
        prefix = name + "."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        modules = {m for m in modules if not m.startswith(prefix)}
        for key, t in mod.state_dict(keep_vars=True).items():
            state[prefix + key] = (tuple(t.shape), t.dtype)
        modules |= {prefix + m for m, _ in mod.named_modules(remove_duplicate=False) if m}
    return state


def check_against(expected: dict[str, Layout], header: dict[str, Layout], aliases: dict[str, str], name: str) -> None:
    """Every expected tensor provided (by the file or an alias of one of its tensors), nothing more,
    each of the expected shape; dtypes equal, except a float tensor stored in another float type (a cast
    pass changes them); an integer tensor (packed codes) never changes type."""
    provided = dict(header)
    for alias, target in aliases.items():
        if target not in header:
            raise LoadError(f"aliases[{alias!r}]: {short(target)} is not a tensor in {name}")
        if alias in header:
            raise LoadError(f"aliases[{alias!r}]: {name} also stores a tensor of that name")
        provided[alias] = header[target]
    missing = [k for k in expected if k not in provided]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LoadError(f"{name}: missing tensor '{missing[0]}'{more} that the model needs")
    extra = [k for k in provided if k not in expected]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise LoadError(f"{name}: tensor {short(extra[0])}{more} is not in the model being loaded")
    for key, (dims, dtype) in expected.items():
        got_dims, got_dtype = provided[key]
        if got_dims != dims:
            raise LoadError(f"{name}: tensor '{key}' has shape {list(got_dims)}, the model needs {list(dims)}")
        if got_dtype != dtype and not (got_dtype.is_floating_point and dtype.is_floating_point):
            raise LoadError(f"{name}: tensor '{key}' is {got_dtype}, the model needs {dtype}")
