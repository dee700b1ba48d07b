"""Progress while a search runs: a rich bar in a terminal, one plain line per trial elsewhere.

rich's live bar needs a real terminal, or Jupyter with ipywidgets; in a kernel without ipywidgets it
prints "install ipywidgets for Jupyter support" on every refresh and draws nothing, and in a pipe or a
log file it draws nothing until the end. There, each finished trial gets one line instead.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import time
from typing import Any

from .objective import beats_original, gain, meets_budget


def _console_kind() -> tuple[bool, bool] | None:
    """(is_jupyter, is_terminal) as rich sees stderr; None without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console(stderr=True)
    return console.is_jupyter, console.is_terminal


def _has_ipywidgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def display_mode(kind: tuple[bool, bool] | None) -> str:
    """"bar" where rich can draw a live bar, else "lines" (no rich, Jupyter without ipywidgets, a pipe)."""
    if kind is None:
        return "lines"
    is_jupyter, is_terminal = kind
    if is_jupyter:
        return "bar" if _has_ipywidgets() else "lines"
    return "bar" if is_terminal else "lines"


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def trial_line(record: Any, done: int, best: str) -> str:
    """One finished trial: pipeline, status, speedup, accuracy drop, and the best so far."""
    status = record.status if record.status == "ok" or not record.reason else f"{record.status} ({record.reason[:80]})"
    speedup = _num(record.speedup, '.2f')
    speedup = speedup if speedup == "n/a" else f"{speedup}x"
    return (f"[optistack search] trial {done}: {record.pipeline}: {status}; speedup {speedup}, "
            f"accuracy drop {_num(record.accuracy_drop, '.4g')}; {best}")


class SearchProgress:
    def __init__(self, plan: Any, objective: str, max_accuracy_drop: float, enabled: bool = True) -> None:
        self.plan, self.objective, self.max_drop = plan, objective, max_accuracy_drop
        self.enabled = enabled
        kind = _console_kind() if enabled else None
        self.mode = display_mode(kind) if enabled else "off"
        # in Jupyter the lines go to stdout, not the pink stderr box that reads like a warning
        self._stream = sys.stdout if kind is not None and kind[0] else sys.stderr
        self._progress: Any = None
        self._task: Any = None
        self._done = 0
        self._started = time.monotonic()

    def __enter__(self) -> "SearchProgress":
        if self.mode != "bar":
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = self.plan.trials if self.plan.trials is not None else self.plan.seconds
        columns = [TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn() if self.plan.trials else
                   TextColumn("{task.completed:.0f}/{task.total:.0f} s"), TimeElapsedColumn(),
                   TextColumn("{task.description}")]
        self._progress = Progress(*columns, console=Console(stderr=True), transient=False)
        self._task = self._progress.add_task("", total=total)
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _best(self, done: dict[str, Any]) -> str:
        ok = [r for r in done.values() if meets_budget(r, self.max_drop) and beats_original(r, self.objective)]
        if not ok:
            return "no trial within the budget beats the original yet"
        best = max(ok, key=lambda r: gain(r, self.objective))
        return f"best {gain(best, self.objective):.2f}x {self.objective}: {best.pipeline}"

    def start(self, already: int, done: dict[str, Any]) -> None:
        self._done = already
        if self._progress is not None and self.plan.trials is not None:
            self._progress.update(self._task, completed=already, description=self._best(done))

    def update(self, record: Any, done: dict[str, Any]) -> None:
        self._done += 1
        if self.mode == "off":
            return
        if self._progress is None:
            print(trial_line(record, self._done, self._best(done)), file=self._stream, flush=True)
            return
        completed = (self._progress.tasks[0].completed + 1 if self.plan.trials is not None
                     else min(time.monotonic() - self._started, self.plan.seconds))
        self._progress.update(self._task, completed=completed, description=self._best(done))
