"""Cases the adversarial sweep found failing and that now hold: a pass cannot reach the caller's model
through the workload, a user metric that breaks is one clear error, odd `info` values cannot break the
JSON report, parse errors are one escaped line, saving to a bad place is one error, a bad TimingConfig is
an OptistackError, and a plugin's sys.exit fails only its own step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from robust_helpers import QUICK, assert_unchanged, one_clear_error, snapshot
from torch import nn

import optistack as ost
from optistack.core.pass_protocol import ConfiguredPass, PassResult


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


X = torch.randn(4, 64)


# 1. A hostile pass reaches the caller's model through ctx.workload.model and zeroes it; nothing notices.
class TouchesOriginal(ConfiguredPass):
    name = "fail-touches-original"

    def apply(self, model, ctx):
        with torch.no_grad():
            for p in ctx.workload.model.parameters():
                p.zero_()
        return PassResult(model)


def test_pass_cannot_change_the_callers_model_through_ctx():
    ost.register_pass(TouchesOriginal)
    model = _mlp()
    before = snapshot(model)
    result = ost.optimize(model, X, "int8-dynamic,fail-touches-original", timing=QUICK, verbose=False)
    assert_unchanged(model, before)
    assert result.report.steps[0].status == "applied"


# 2. A user eval_fn that raises (or returns a non-number) escapes optimize() as a raw exception,
#    while a user forward that raises is wrapped in one WorkloadError.
@pytest.mark.parametrize("fn", [lambda m: (_ for _ in ()).throw(ValueError("user metric broke")), lambda m: "good"],
                         ids=["raises", "returns-str"])
def test_eval_fn_problem_is_one_clear_error(fn):
    with pytest.raises(Exception) as excinfo:
        ost.optimize(_mlp(), X, "int8-dynamic", eval_fn=fn, higher_is_better=True, timing=QUICK, verbose=False)
    one_clear_error(excinfo, "eval_fn")


# 3. A pass whose info holds a non-JSON value (tensor, object) makes report.to_json() raise a raw TypeError
#    (so `--json`, report.save and the CLI report path crash after a whole run).
class OddInfo(ConfiguredPass):
    name = "fail-odd-info"

    def apply(self, model, ctx):
        return PassResult(model, info={"tensor": torch.ones(2), "obj": object()})


def test_report_json_survives_odd_info():
    ost.register_pass(OddInfo)
    result = ost.optimize(_mlp(), X, "fail-odd-info", timing=QUICK, verbose=False)
    text = result.report.to_json()
    assert "fail-odd-info" in text


# 4. Pipeline syntax errors are one line (the text with a caret where reading stopped), here and on the CLI.
@pytest.mark.parametrize("text", ["awq{", "int8-dynamic,", "rtn-int4{group_size=32", 'fp8{skip="x}', "@"])
def test_parse_error_is_one_line(text):
    with pytest.raises(ost.OptistackError) as excinfo:
        ost.Pipeline.parse(text)
    assert "\n" not in str(excinfo.value), repr(str(excinfo.value))


def test_cli_parse_error_is_one_line(tmp_path):
    exe = Path(sys.executable).with_name("optistack")
    if not exe.exists():
        pytest.skip("the optistack command is not installed beside this Python")
    proc = subprocess.run([str(exe), "run", "--pipeline", "awq{"], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Failed to load" not in ln and "pytree" not in ln]
    assert len(lines) == 1, lines


# 5. Parse errors echo control / bidi characters raw (NUL, U+202E) into the message and the terminal.
def test_parse_error_escapes_control_characters():
    with pytest.raises(ost.OptistackError) as excinfo:
        ost.Pipeline.parse("int8-dynamic\u202e,\x00x")
    assert "\x00" not in str(excinfo.value) and "\u202e" not in str(excinfo.value), repr(str(excinfo.value))


# 6. result.save onto an existing file / an unwritable place raises raw FileExistsError / FileNotFoundError.
@pytest.mark.parametrize("where", ["existing-file", "proc"])
def test_save_to_bad_path_is_one_clear_error(where, tmp_path):
    result = ost.optimize(_mlp(), X, "rtn-int4{group_size=32}", timing=QUICK, verbose=False)
    target = tmp_path / "f" if where == "existing-file" else Path("/proc/optistack-robust")
    if where == "existing-file":
        target.write_text("x")
    with pytest.raises(Exception) as excinfo:
        result.save(target)
    one_clear_error(excinfo)


# 7. TimingConfig validation raises ValueError, not an OptistackError (one except clause does not catch it).
def test_timing_config_error_is_optistack_error():
    with pytest.raises(Exception) as excinfo:
        ost.TimingConfig(min_rounds=1)
    one_clear_error(excinfo, "min_rounds")


# 8. sys.exit() inside a third-party pass's apply fails that step; the run and its report go on.
class Exits(ConfiguredPass):
    name = "fail-exits"

    def apply(self, model, ctx):
        sys.exit(3)


def test_sys_exit_in_a_pass_fails_only_that_step():
    ost.register_pass(Exits)
    result = ost.optimize(_mlp(), X, "int8-dynamic,fail-exits", timing=QUICK, verbose=False)
    assert result.report.steps[1].status == "failed"


# 1b. A pass that reaches the caller's model by some other route (a reference it kept) is caught: the
#     in-place edit counters of the original changed, so its step fails and its result is not kept.
VICTIM: list[nn.Module] = []


class KeepsAReference(ConfiguredPass):
    name = "fail-keeps-a-reference"

    def apply(self, model, ctx):
        with torch.no_grad():
            VICTIM[0][0].weight.mul_(1.0)
        return PassResult(model)


def test_a_write_into_the_original_by_any_route_fails_the_step():
    ost.register_pass(KeepsAReference)
    model = _mlp()
    VICTIM[:] = [model]
    result = ost.optimize(model, X, "int8-dynamic,fail-keeps-a-reference", timing=QUICK, verbose=False)
    step = result.report.steps[1]
    assert step.status == "failed" and "original" in step.reason, (step.status, step.reason)
    assert result.report.steps[0].status == "applied"
