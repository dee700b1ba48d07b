"""Tampered saved folders: every change to a saved file is one LoadError (one line, naming the file or
key), loading never writes anything, and an untouched folder loads back with the same outputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from robust_helpers import QUICK, call, rel_error
from torch import nn

import optistack as ost
from optistack.core.errors import LoadError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


X = torch.randn(4, 64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    result = ost.optimize(_mlp(), X, "prune-magnitude{sparsity=0.3},rtn-int4{group_size=32}", timing=QUICK,
                          verbose=False)
    assert [s.status for s in result.report.steps] == ["applied", "applied"], result.report.steps
    folder = tmp_path_factory.mktemp("robust") / "saved"
    result.save(folder)
    return result, folder


def _flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x20
    path.write_bytes(bytes(data))


def _manifest_edit(edit):
    def tamper(folder):
        path = folder / "optistack.json"
        doc = json.loads(path.read_text(encoding="utf-8"))
        edit(doc)
        path.write_text(json.dumps(doc), encoding="utf-8")
    return tamper


def _link_weights_outside(folder):
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(outside)


TAMPER = {
    "weights-byte-flipped": (lambda f: _flip(f / "model.safetensors"), "model.safetensors"),
    "weights-header-flipped": (lambda f: _flip(f / "model.safetensors", 0.001), "model.safetensors"),
    "weights-truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
                          "model.safetensors"),
    "weights-empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors"),
    "weights-missing": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
    "weights-linked-outside": (_link_weights_outside, "model.safetensors"),
    "manifest-missing": (lambda f: (f / "optistack.json").unlink(), "optistack.json"),
    "manifest-not-json": (lambda f: (f / "optistack.json").write_text("{oops", encoding="utf-8"), "optistack.json"),
    "manifest-a-list": (lambda f: (f / "optistack.json").write_text("[1, 2]", encoding="utf-8"), "optistack.json"),
    "manifest-byte-flipped": (lambda f: _flip(f / "optistack.json"), ""),
    "manifest-format-changed": (_manifest_edit(lambda d: d.update(format="optistack.model/99")), ""),
    "manifest-extra-key": (_manifest_edit(lambda d: d.update(evil="__import__('os')")), ""),
    "manifest-no-integrity": (_manifest_edit(lambda d: d.pop("integrity", None)), ""),
    "manifest-file-escapes": (_manifest_edit(lambda d: d.get("integrity", {}).get("files", {}).update(
        {"../outside": {"sha256": "0" * 64, "bytes": 1}})), ""),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_folder_is_one_load_error(case, saved, tmp_path):
    _, folder = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    tamper, names = TAMPER[case]
    tamper(copy)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(Exception) as excinfo:
        ost.load_model(copy, model=_mlp())
    assert isinstance(excinfo.value, LoadError), f"raw {type(excinfo.value).__name__}: {excinfo.value}"
    msg = str(excinfo.value).strip()
    assert msg and "\n" not in msg, repr(msg)
    assert names in msg, f"the error does not name {names!r}: {msg}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing, "load wrote or removed files"


def test_untouched_folder_loads_back_with_the_same_outputs(saved):
    result, folder = saved
    loaded = ost.load_model(folder, model=_mlp())
    assert rel_error(call(loaded, X), call(result.model, X)) == 0.0


def test_unlisted_extra_file_is_never_read(saved, tmp_path):
    result, folder = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "evil.py").write_text("raise SystemExit('ran code from a saved folder')\n", encoding="utf-8")
    loaded = ost.load_model(copy, model=_mlp())
    assert rel_error(call(loaded, X), call(result.model, X)) == 0.0


def test_load_into_the_wrong_model_is_one_load_error(saved):
    _, folder = saved
    with pytest.raises(LoadError) as excinfo:
        ost.load_model(folder, model=nn.Sequential(nn.Linear(3, 3)))
    assert "\n" not in str(excinfo.value).strip()
