"""Packaging rules that pip cannot express: no extra may pull both ONNX Runtime builds."""
from __future__ import annotations

import re
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def resolved_extras() -> dict[str, set[str]]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]

    def resolve(name: str, seen: frozenset = frozenset()) -> set[str]:
        out: set[str] = set()
        for req in extras[name]:
            m = re.fullmatch(r"optistack\[([\w,\-]+)\]", req)
            if m:
                for inner in m.group(1).split(","):
                    if inner not in seen:
                        out |= resolve(inner, seen | {name})
            else:
                out.add(re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].lower())
        return out

    return {name: resolve(name) for name in extras}


def test_no_extra_installs_both_onnxruntime_builds():
    for name, packages in resolved_extras().items():
        assert not {"onnxruntime", "onnxruntime-gpu"} <= packages, f"extra [{name}] pulls both ONNX Runtime builds"
    extras = resolved_extras()
    assert "onnxruntime" in extras["onnx"] and "onnxruntime-gpu" in extras["gpu"]


def test_both_builds_installed_makes_the_ort_passes_unavailable(monkeypatch):
    import importlib.metadata

    from optistack.passes.export.onnx import OnnxExportPass
    from optistack.passes.export.session import one_onnxruntime

    assert one_onnxruntime().ok  # this environment has one build
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: real("onnxruntime") if name == "onnxruntime-gpu" else real(name))
    avail = OnnxExportPass().requirements()
    assert not avail.ok and "both installed" in avail.reason and "optistack[gpu]" in avail.reason
