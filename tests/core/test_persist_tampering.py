"""Property: whatever is done to a saved folder, `optistack.load_model` either rebuilds the same model or
raises one LoadError — never another exception, never a file written anywhere, never a process, a
socket, or code compiled from a string.

Two attackers: a careless one (bytes flipped, keys edited, checksums left as they were: the same model
or LoadError) and a deliberate one who recomputes every checksum after the edit (LoadError, or a model
built only from what the registries allow; still nothing written or run).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import struct
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_llama

from optistack.bench.report import Step
from optistack.checkpoints.loadables import load_model
from optistack.core.checksums import manifest_digest, sha256_file
from optistack.core.errors import LoadError
from optistack.core.pass_protocol import PassContext
from optistack.core.persist import save_model
from optistack.passes.quant.rtn import RtnInt4Pass

SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
IDS = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))

# ---------------------------------------------------------------- side-effect watch (audit hooks)

_WATCH: list[list[str]] = []
_STDLIB = sysconfig.get_paths()["stdlib"]  # the events seen while a load runs (one list per active watch)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_RUN_EVENTS = {"os.system", "subprocess.Popen", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
               "pty.spawn", "ctypes.dlopen", "socket.connect", "socket.bind", "urllib.Request", "os.startfile"}


def _audit(event: str, args: tuple) -> None:
    if not _WATCH:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS)
        if writes and "__pycache__" not in str(path):
            _WATCH[-1].append(f"write {path}")
    elif event in ("os.remove", "os.rename", "os.replace", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                   "shutil.rmtree", "shutil.copyfile", "os.chmod"):
        _WATCH[-1].append(f"{event} {args[0] if args else ''}")
    elif event in _RUN_EVENTS:
        _WATCH[-1].append(f"{event} {args[:1]}")
    elif event == "exec" and args and hasattr(args[0], "co_filename") and not os.path.isfile(args[0].co_filename):
        caller = sys._getframe(1).f_code.co_filename  # stdlib code generation (dataclasses, namedtuple) is fine
        if not caller.startswith(_STDLIB):
            _WATCH[-1].append(f"exec of code compiled from {args[0].co_filename} by {caller}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; it only records while a watch is active


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for base, dirs, files in os.walk(root):
            for name in dirs + files:
                p = os.path.join(base, name)
                st_ = os.lstat(p)
                out[p] = (st_.st_size, st_.st_mtime_ns)
    return out


@contextlib.contextmanager
def no_side_effects(root: Path):
    """Run with cwd and the temp dir inside `root`; afterwards nothing under `root` changed and no
    write, process, socket or string-compiled code was seen."""
    cwd, tmp = root / "cwd", root / "tmp"
    cwd.mkdir(exist_ok=True), tmp.mkdir(exist_ok=True)
    before = tree(root)
    old_cwd, old_tmp = os.getcwd(), tempfile.tempdir
    events: list[str] = []
    os.chdir(cwd)
    tempfile.tempdir = str(tmp)
    _WATCH.append(events)
    try:
        yield
    finally:
        _WATCH.remove(events)
        os.chdir(old_cwd)
        tempfile.tempdir = old_tmp
    assert events == [], events
    assert tree(root) == before, "load changed files: " + str(set(tree(root).items()) ^ set(before.items()))


def try_load(folder: Path, root: Path):
    """The loaded model, or the LoadError; anything else fails the test (inside no_side_effects)."""
    with no_side_effects(root):
        try:
            out = load_model(folder)
        except LoadError as exc:
            assert "\n" not in str(exc), "a LoadError is one line"
            out = exc
    event("refused: " + str(out).split(": ")[1] if isinstance(out, LoadError) else "loaded")
    return out


# ---------------------------------------------------------------- the saved folders

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama (tied embeddings) with int4 layers, saved; and its logits."""
    model = tiny_llama(vocab_size=128, tie_word_embeddings=True)
    p = RtnInt4Pass(group_size=32)
    result = p.apply(copy.deepcopy(model), PassContext())
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_model(folder, result.model, model, [Step(pass_name=p.name, config=p.config.to_dict(), text=str(p),
                                                  info=result.info, status="applied")], {"name": "tiny"})
    with torch.no_grad():
        logits = result.model(IDS).logits
    load_model(folder)  # warm: imports done once, so the watch sees only what a load itself does
    return folder, logits


def onnx_graph(path: Path, external: bool) -> None:
    """y = x @ W + b, with W stored beside the graph when `external`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path), save_as_external_data=external, location="graph.data", size_threshold=0)


@pytest.fixture(scope="module")
def saved_onnx(tmp_path_factory):
    """An ONNX Runtime model (weights in an external-data file), saved; and its output."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import numpy as np

    from optistack.passes.export.session import OrtModel

    src = tmp_path_factory.mktemp("onnx-src")
    onnx_graph(src / "graph.onnx", external=True)
    folder = tmp_path_factory.mktemp("saved-onnx") / "model"
    model = OrtModel(str(src / "graph.onnx"), intra_op_threads=1, provider="cpu")
    save_model(folder, model, None, [], {"name": "tiny-onnx"})
    x = np.ones((2, 8), dtype=np.float32)
    load_model(folder)
    return folder, x, model(x)


def refresh_checksums(folder: Path) -> None:
    """What a deliberate attacker does after editing: recompute every checksum the manifest holds."""
    manifest = json.loads((folder / "optistack.json").read_text())
    integrity = manifest.get("integrity") if isinstance(manifest, dict) else None
    if not isinstance(integrity, dict):
        return
    files = integrity.get("files")
    for name in list(files) if isinstance(files, dict) else []:
        with contextlib.suppress(ValueError, OSError):
            path = folder / str(name)
            if isinstance(files[name], dict) and path.is_file() and path.resolve().is_relative_to(folder.resolve()):
                files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    integrity["manifest_sha256"] = manifest_digest(manifest)
    (folder / "optistack.json").write_text(json.dumps(manifest))


def copy_of(folder: Path) -> tuple[Path, Path]:
    root = Path(tempfile.mkdtemp(prefix="tamper-", dir=folder.parent.parent))
    shutil.copytree(folder, root / "model")
    return root, root / "model"


# ---------------------------------------------------------------- manifest mutations

NASTY = ["os:system", "optistack.core.persist:save_model", "transformers:pipeline", "pipeline", "AutoModel",
         "../../outside", "/etc/passwd", "torch.nn.Linear", "optistack.passes.quant.int4:Int4Linear", "__class__",
         "optimized_model_path", "attn_implementation", "kernels-community/flash-attn", "compile", "speculative",
         "model.safetensors", "optistack.model/1", "LlamaForCausalLM", "BertModel", "float8_e4m3fn", "cuda-int4pack"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 20), st.sampled_from([0, -1, 2**63, 1 << 40]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(NASTY))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(NASTY) | st.text(max_size=8),
                                                                      inner, max_size=3)), max_leaves=6)


def paths(node, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, prefix + (i,))
    return out


def mutate(manifest: dict, data) -> None:
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(manifest) or [()]))
        parent = manifest
        for key in where[:-1]:
            parent = parent[key]
        op = data.draw(st.sampled_from(["delete", "replace", "insert", "nudge"]))
        if op == "insert" or not where:
            target = parent[where[-1]] if where and isinstance(parent[where[-1]], (dict, list)) else manifest
            if isinstance(target, dict):
                target[data.draw(st.sampled_from(NASTY) | st.text(max_size=8))] = data.draw(values)
            else:
                target.append(data.draw(values))
        elif op == "delete":
            del parent[where[-1]]
        elif op == "nudge" and type(parent[where[-1]]) is int:
            parent[where[-1]] += data.draw(st.sampled_from([-1, 1, 32, -64]))
        else:
            parent[where[-1]] = data.draw(values)


@SETTINGS
@given(data=st.data(), deliberate=st.booleans())
def test_a_mutated_manifest_loads_the_same_model_or_is_one_load_error(saved, data, deliberate):
    folder, logits = saved
    root, target = copy_of(folder)
    try:
        manifest = json.loads((target / "optistack.json").read_text())
        mutate(manifest, data)
        (target / "optistack.json").write_text(json.dumps(manifest))
        if deliberate:
            refresh_checksums(target)
        out = try_load(target, root)
        if not isinstance(out, LoadError) and not deliberate:
            with torch.no_grad():
                assert torch.equal(out(IDS).logits, logits)
        assert isinstance(out, (LoadError, torch.nn.Module))
    finally:
        shutil.rmtree(root)


@settings(SETTINGS, max_examples=30)
@given(data=st.data(), deliberate=st.booleans())
def test_a_mutated_onnx_manifest_loads_the_same_session_or_is_one_load_error(saved_onnx, data, deliberate):
    folder, x, y = saved_onnx
    root, target = copy_of(folder)
    try:
        manifest = json.loads((target / "optistack.json").read_text())
        mutate(manifest, data)
        (target / "optistack.json").write_text(json.dumps(manifest))
        if deliberate:
            refresh_checksums(target)
        out = try_load(target, root)
        if not isinstance(out, LoadError) and not deliberate:
            assert torch.equal(out(x), y)
    finally:
        shutil.rmtree(root)


# ---------------------------------------------------------------- weight-file mutations

def _rewrite_tensors(path: Path, data) -> None:
    """A well-formed safetensors file with one tensor reshaped, retyped, dropped or added."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(state)))
    op = data.draw(st.sampled_from(["reshape", "retype", "drop", "add", "grow"]))
    t = state[key]
    if op == "reshape" and t.dim() >= 2:
        state[key] = t.reshape(t.shape[1], t.shape[0], *t.shape[2:]).contiguous()
    elif op == "reshape":
        state[key] = t.reshape(1, -1).contiguous()
    elif op == "retype":
        state[key] = t.to(data.draw(st.sampled_from([torch.float16, torch.int32, torch.uint8, torch.float64])))
    elif op == "drop":
        del state[key]
    elif op == "add":
        state["model.extra.weight"] = torch.zeros(3)
    else:
        state[key] = torch.cat([t, t[:1]]) if t.dim() else t.reshape(1)
    save_file(state, str(path))


def _raw_edit(path: Path, data) -> None:
    raw = bytearray(path.read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "header-length", "header-text"]))
    if op == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    elif op == "header-length":
        raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 7, len(raw), 1 << 62])))
    else:
        n = struct.unpack("<Q", bytes(raw[:8]))[0]
        i = data.draw(st.integers(8, 8 + n - 1))
        raw[i] = ord(data.draw(st.sampled_from(list('{}[]",:0123456789 x'))))
    path.write_bytes(bytes(raw))


@SETTINGS
@given(data=st.data(), deliberate=st.booleans(), semantic=st.booleans())
def test_a_mutated_weight_file_loads_the_same_model_or_is_one_load_error(saved, data, deliberate, semantic):
    folder, logits = saved
    root, target = copy_of(folder)
    try:
        weights = target / "model.safetensors"
        original = weights.read_bytes()
        (_rewrite_tensors if semantic else _raw_edit)(weights, data)
        if deliberate:
            refresh_checksums(target)
        out = try_load(target, root)
        if weights.read_bytes() == original:
            with torch.no_grad():
                assert torch.equal(out(IDS).logits, logits)
        elif not isinstance(out, LoadError):
            assert deliberate, "a changed weight file loaded although its checksum was left as saved"
            assert isinstance(out, torch.nn.Module)
    finally:
        shutil.rmtree(root)
