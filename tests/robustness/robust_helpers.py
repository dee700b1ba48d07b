"""Shared pieces of the robustness sweep: a quick timing, the one-clear-error check, model snapshots.

The sweep plays a held-out suite: every case must end applied with close outputs, skipped / rejected /
failed with a reason, or one clear `OptistackError` whose message is a single line naming the problem.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import optistack as ost

# Few rounds and a short cap: the sweep checks outcomes, not speed (tests never assert on wall-clock).
QUICK = ost.TimingConfig(warmup=0, min_rounds=3, max_rounds=4, max_seconds=1.0, noise_floor=False)
STATUSES = {"applied", "skipped", "rejected", "failed"}


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """What a run must not change on the caller's model: every tensor, every module's mode, requires_grad."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": {name: m.training for name, m in model.named_modules()},
        "grads": {name: p.requires_grad for name, p in model.named_parameters()},
        "types": {name: type(m) for name, m in model.named_modules()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "the caller's model has different submodules after the run"
    assert after["state"].keys() == before["state"].keys(), "the caller's state_dict keys changed"
    for key, value in before["state"].items():
        now = after["state"][key]
        assert now.dtype == value.dtype and now.shape == value.shape, f"{key}: dtype/shape changed"
        assert torch.equal(now, value) or (value.is_floating_point() and torch.equal(now.isnan(), value.isnan())
                                           and torch.equal(now.nan_to_num(), value.nan_to_num())), f"{key} changed"
    assert after["modes"] == before["modes"], "the caller's train/eval mode changed"
    assert after["grads"] == before["grads"], "the caller's requires_grad changed"


def one_clear_error(excinfo: pytest.ExceptionInfo, *words: str, caret_ok: bool = False) -> str:
    """The raised error is an OptistackError with a one-line message mentioning each of `words`.

    `caret_ok`: a pipeline syntax error may add the text and a caret under the position (two more
    lines); its first line must then say what is wrong and where on its own."""
    exc = excinfo.value
    assert isinstance(exc, ost.OptistackError), f"raw {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip(), "empty error message"
    lines = msg.strip().split("\n")
    if caret_ok and len(lines) == 3 and lines[2].strip() == "^":
        assert "position" in lines[0], f"the first line does not say where: {msg!r}"
        msg = lines[0]
    assert "\n" not in msg.strip(), f"multi-line message: {msg!r}"
    low = msg.lower()
    for w in words:
        assert w.lower() in low, f"message does not name {w!r}: {msg}"
    return msg


def check_steps(result: Any, *, max_rel_error: float | None = None) -> None:
    """Every step has a known status; non-applied ones give a reason; applied ones have finite, close outputs."""
    for step in result.report.steps:
        assert step.status in STATUSES, f"{step.text}: unknown status {step.status!r}"
        if step.status != "applied":
            assert step.reason and str(step.reason).strip(), f"{step.text}: {step.status} without a reason"
            continue
        acc = step.accuracy
        assert acc is not None, f"{step.text}: applied without an accuracy measurement"
        assert math.isfinite(acc.after), f"{step.text}: applied with non-finite score {acc.after}"
        if max_rel_error is not None and acc.metric == "rel_error":
            assert acc.after <= max_rel_error, f"{step.text}: relative error {acc.after:.4f} > {max_rel_error}"


def outputs_finite(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out.float()).all()) if out.is_floating_point() else True
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else list(out.values())
    if isinstance(out, (list, tuple)):
        return all(outputs_finite(o) for o in out)
    return True


def call(model: Any, batch: Any) -> Any:
    with torch.no_grad():
        return model(**batch) if isinstance(batch, dict) else model(batch)


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return first_tensor(out[0])


def rel_error(a: Any, b: Any) -> float:
    x, y = first_tensor(a).float(), first_tensor(b).float()
    return float((x - y).norm() / y.norm().clamp_min(1e-12))
