"""Bad command lines: exit code 2 and one error line on stderr, never a traceback.

Each case starts the real `optistack` console script (a second or more each), so the list is short and
aimed at what a user mistypes: a model, a path, a pipeline, a data file, a report.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("optistack")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([str(EXE), *args], check=False, capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd)


def _error_lines(stderr: str) -> list[str]:
    """stderr without library warnings printed at import (torchao's optional kernels, torch's pytree)."""
    noise = ("Failed to load", "_pytree.py", "UserWarning", "warnings.warn", "FutureWarning")
    return [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in noise)]


CASES = {
    "unknown-model": (["run", "--model", "nosuchmodel", "--pipeline", "int8-dynamic"], ["nosuchmodel"]),
    "missing-model-path": (["run", "--model", "/nonexistent/path", "--pipeline", "int8-dynamic"], ["/nonexistent/path"]),
    "empty-pipeline": (["run", "--pipeline", ""], ["pipeline"]),
    "whitespace-pipeline": (["run", "--pipeline", "  \t "], ["pipeline"]),
    "unknown-pass": (["run", "--pipeline", "int9-dynamic"], ["int9-dynamic"]),
    "no-such-preset": (["run", "--pipeline", "@no-such-preset"], ["no-such-preset"]),
    "bad-option-value": (["run", "--pipeline", "prune-magnitude{sparsity=1.5}"], ["sparsity"]),
    "unknown-option": (["run", "--pipeline", "int8-dynamic{frobnicate=1}"], ["frobnicate"]),
    "compile-then-int8": (["run", "--pipeline", "compile,int8-dynamic"], ["int8-dynamic"]),
    "missing-data": (["run", "--pipeline", "int8-dynamic", "--data", "/nonexistent"], ["/nonexistent"]),
    "missing-factory-module": (["run", "--model", "no_such_module_xyz:build", "--pipeline", "int8-dynamic"],
                               ["no_such_module_xyz"]),
    "folder-without-model": (["run", "--model", "{tmp}", "--pipeline", "int8-dynamic"], []),
    "missing-report": (["report", "/nonexistent/report.json"], ["/nonexistent/report.json"]),
    "report-not-json": (["report", "{tmp}/junk.json"], []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line_exits_2_with_one_error(case, tmp_path):
    (tmp_path / "junk.json").write_text("{not json at all", encoding="utf-8")
    args, words = CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = _run(*args, cwd=tmp_path)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and lines[0].startswith("optistack: error:"), proc.stderr
    assert len(lines) == 1, f"{len(lines)} error lines: {lines}"
    for w in words:
        assert w in lines[0], f"the error does not name {w!r}: {lines[0]}"


def test_pipeline_syntax_error_exits_2_and_says_where(tmp_path):
    """`awq{`: exit 2, no traceback; the first line says what is wrong and at which position (a caret
    display of the text may follow it)."""
    proc = _run("run", "--pipeline", "awq{", cwd=tmp_path)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("optistack: error:") and "position" in lines[0], lines
    assert len(lines) <= 3, lines
