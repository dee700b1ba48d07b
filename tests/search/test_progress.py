"""Progress falls back to one plain line per trial where rich cannot draw a bar (Jupyter without
ipywidgets printed "install ipywidgets for Jupyter support" on every refresh and showed no bar)."""
from __future__ import annotations

import warnings

import pytest

from optistack.search import progress
from optistack.search.objective import Budget
from optistack.search.store import TrialRecord


@pytest.mark.parametrize("kind, ipywidgets, mode", [
    ((True, False), False, "lines"),  # Jupyter kernel without ipywidgets
    ((True, False), True, "bar"),  # Jupyter with ipywidgets: rich draws a widget
    ((False, True), False, "bar"),  # a real terminal
    ((False, False), False, "lines"),  # a pipe or a log file
    (None, True, "lines"),  # no rich
])
def test_display_mode(monkeypatch, kind, ipywidgets, mode):
    monkeypatch.setattr(progress, "_has_ipywidgets", lambda: ipywidgets)
    assert progress.display_mode(kind) == mode


def _record(pipeline, speedup, drop, status="ok", reason=None):
    return TrialRecord(pipeline=pipeline, status=status, report={"baseline": {}}, reason=reason, speedup=speedup,
                       speedup_ci95=(speedup * 0.9, speedup * 1.1) if speedup else (None, None),
                       accuracy_drop=drop, max_step_drop=drop)


def test_jupyter_without_ipywidgets_prints_one_line_per_trial_and_no_warning(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_console_kind", lambda: (True, False))
    monkeypatch.setattr(progress, "_has_ipywidgets", lambda: False)
    import rich.progress

    def no_bar(*args, **kwargs):
        raise AssertionError("a rich Progress must not start in this case")

    monkeypatch.setattr(rich.progress, "Progress", no_bar)
    trials = [_record("int8-dynamic", 0.78, 0.003), _record("int8-weight", 1.25, 0.004),
              _record("rtn-int4", None, None, status="failed", reason="RuntimeError: boom")]
    done = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with progress.SearchProgress(Budget(trials=3), "latency", 0.01) as bar:
            bar.start(0, done)
            for r in trials:
                done[r.pipeline] = r
                bar.update(r, done)
    assert bar.mode == "lines" and not caught
    lines = capsys.readouterr().out.strip().splitlines()  # Jupyter: stdout, not the stderr box
    assert len(lines) == 3
    assert "int8-dynamic: ok" in lines[0] and "speedup 0.78x" in lines[0] and "accuracy drop 0.003" in lines[0]
    assert "no trial within the budget beats the original yet" in lines[0]  # 0.78x is no win
    assert "best 1.25x latency: int8-weight" in lines[1]
    assert "rtn-int4: failed (RuntimeError: boom)" in lines[2] and "speedup n/a" in lines[2]


def test_disabled_progress_prints_nothing(capsys):
    with progress.SearchProgress(Budget(trials=1), "latency", 0.01, enabled=False) as bar:
        bar.update(_record("identity", 1.0, 0.0), {})
    assert capsys.readouterr() == ("", "")
