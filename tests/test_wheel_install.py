"""What a downstream user gets from `pip install optistack`: a wheel built from this tree, installed in a
clean venv (torch only, no extra), must import, run a pipeline, and say which pip extra enables each
pass it cannot run. Under a minute on an idle machine: the build, a fresh venv, torch from the pinned local wheel."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("build") is None,
                                 reason="needs the build package: pip install 'optistack[test]'")]

ROOT = Path(__file__).resolve().parents[1]
# Passes whose requirements are a pip extra, and the extra their reason must name.
EXTRA_OF_PASS = {"int8-dynamic": "quant", "int8-weight": "quant", "onnx-export": "onnx", "ort-optimize": "onnx",
                 "ort-quantize": "onnx", "tensorrt": "tensorrt", "lora-merge": "serving",
                 "prompt-compress": "serving"}
OPTIONAL_MODULES = ("transformers", "torchao", "onnx", "onnxruntime", "rich", "matplotlib", "scipy", "peft",
                    "optuna", "triton", "tensorrt")


def _run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("PYTHONPATH", None)  # nothing from this checkout may leak into the clean venv
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _setuptools_builds_wheels() -> bool:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return (major, minor) >= (70, 1)


def _build_wheel(tmp: Path, kernels: bool = False) -> Path:
    """Build from a copy of the tree, so the checkout gets no build/ or egg-info and parallel runs don't clash.

    Without isolation when this venv's setuptools can build wheels alone (>= 70.1, no `wheel` package
    needed): an isolated build installs setuptools and torch into a fresh environment on every run.
    Without the prebuilt kernels unless `kernels` (compiling them takes many minutes: test_wheel_kernels.py).
    """
    src = tmp / "src-copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    isolation = ["--no-isolation", "--skip-dependency-check"] if _setuptools_builds_wheels() else []
    env = {"OPTISTACK_PREBUILT": "1" if kernels else "0"}
    _run([sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", str(tmp / "dist"), str(src)], cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("optistack-*.whl")
    return wheel


def _passes_json(bin_dir: Path, cwd: Path) -> dict[str, dict]:
    """`optistack passes --json` of the installed console script, by pass name."""
    return {r["name"]: r for r in json.loads(_run([str(bin_dir / "optistack"), "passes", "--json"], cwd=cwd).stdout)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, venv python, venv bin dir) with only torch (pinned) and the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel-install")
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling torch's sources takes longer than installing them
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
    _run(pip + ["-c", str(ROOT / "constraints.txt"), "torch"], cwd=tmp)
    _run(pip + [str(wheel)], cwd=tmp)
    return wheel, python, venv / "bin"


def test_the_wheel_holds_the_package_data(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("optistack/py.typed", "optistack/csrc/cpu/ops.cpp", "optistack/csrc/cpu/bindings.cpp",
                     "optistack/csrc/cuda/ops.cu", "optistack/workloads/data/minilm_eval.txt",
                     "optistack/workloads/data/minilm_calib.txt", "optistack/workloads/data/longqa_facts.txt"):
        assert required in names, f"{required} is missing from {wheel.name}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[optistack.passes]" in text and "int8-dynamic" in text and "[optistack.workloads]" in text


def test_import_and_a_pipeline_work_with_no_extra_installed(installed, tmp_path):
    _, python, _ = installed
    code = f"""
import importlib.util, json, sys
present = [m for m in {OPTIONAL_MODULES!r} if importlib.util.find_spec(m) is not None]
import optistack
lean = "torch" not in sys.modules
import torch
result = optistack.optimize(torch.nn.Linear(8, 8), torch.randn(2, 8), "identity", verbose=False,
                            timing=optistack.TimingConfig(warmup=1, min_rounds=3, max_rounds=3, max_seconds=1))
print(json.dumps({{"present": present, "lean": lean, "file": optistack.__file__,
                  "statuses": [s.status for s in result.report.steps], "html": "<table" in result._repr_html_()}}))
"""
    out = json.loads(_run([str(python), "-c", code], cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert out["present"] == [], f"the clean venv has optional packages: {out['present']}"
    assert str(python.parents[1]) in out["file"], "optistack was imported from the checkout, not the wheel"
    assert out["lean"], "import optistack imported torch"
    assert out["statuses"] == ["applied"] and out["html"]


def test_passes_from_missing_extras_say_which_extra_enables_them(installed, tmp_path):
    _, _, bin_dir = installed
    rows = _passes_json(bin_dir, tmp_path)
    assert {"identity", "int8-dynamic", "onnx-export"} <= set(rows)
    for name, extra in EXTRA_OF_PASS.items():
        assert not rows[name]["available"], f"{name} claims to be available without optistack[{extra}]"
        assert f"optistack[{extra}]" in rows[name]["reason"], f"{name}: {rows[name]['reason']}"
    unavailable = {n: r["reason"] for n, r in rows.items() if not r["available"]}
    lacking = {n: why for n, why in unavailable.items() if "pip install" not in (why or "")}
    assert not lacking, f"unavailable passes whose reason has no pip hint: {lacking}"
    assert rows["identity"]["available"]


def test_the_passes_table_prints_without_the_report_extra(installed, tmp_path):
    _, _, bin_dir = installed
    proc = _run([str(bin_dir / "optistack"), "passes"], cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "int8-dynamic" in proc.stdout and "optistack[quant]" in proc.stdout


def test_passes_for_transformers_models_need_the_hf_extra(installed, tmp_path):
    _, _, bin_dir = installed
    rows = _passes_json(bin_dir, tmp_path)
    for name in ("attention", "kv-cache", "speculative"):
        assert not rows[name]["available"] and "optistack[hf]" in rows[name]["reason"], name
