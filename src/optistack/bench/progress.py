"""A progress instrument: one line per pass on stderr, so long runs say what they are doing."""
from __future__ import annotations

import sys
from typing import Any


class ProgressInstrument:
    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def before_pipeline(self, state: Any) -> None:
        self._say(f"[optistack] {state.workload.name}: pipeline '{state.report.pipeline}'")

    def before_pass(self, p: Any, step: Any, state: Any) -> None:
        self._say(f"[optistack]   {step.text} ...")

    def after_step(self, p: Any, step: Any, state: Any) -> None:
        """The runner's verdict, whatever it was (applied, rejected, skipped, failed)."""
        speed = f" {step.speedup['median']:.2f}x" if step.speedup else ""
        acc = step.accuracy
        score = f", {acc.metric} {acc.after:.4g}" if acc is not None else ""
        why = f" ({step.reason})" if step.reason else ""
        self._say(f"[optistack]   {step.text}: {step.status}{speed}{score}{why}")
