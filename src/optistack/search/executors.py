"""Where trials run: here, one at a time, or on Ray workers (see `ray_executor`).

An executor takes pipeline texts (`submit`) and hands back finished `TrialRecord`s (`wait`); the
driver alone writes the store. `timing_policy` is printed in the search report.
"""
from __future__ import annotations

from typing import Any

from .store import TrialRecord
from .trial import NoLock, TrialRunner


class LocalExecutor:
    """Trials in this process, one at a time; the prefix cache lives as long as the search."""

    capacity = 1
    timing_policy = NoLock.policy

    def __init__(self, workload: Any, timing: Any, cache_size: int = 8) -> None:
        self.runner = TrialRunner(workload, timing, cache_size=cache_size)
        self._queue: list[tuple[str, str]] = []

    def submit(self, text: str, phase: str) -> None:
        self._queue.append((text, phase))

    def wait(self) -> list[TrialRecord]:
        text, phase = self._queue.pop(0)
        return [self.runner.run(text, phase)]

    def close(self) -> None:
        self._queue.clear()


def make_executor(workload: Any, timing: Any, workers: int, address: str | None, cache_size: int = 8) -> Any:
    if workers == 1 and address is None:
        return LocalExecutor(workload, timing, cache_size)
    from .ray_executor import RayExecutor

    return RayExecutor(workload, timing, workers=workers, address=address, cache_size=cache_size)
