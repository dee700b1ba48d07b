"""Trials on Ray: one actor per worker, each with its own workload copy and prefix cache.

Timing policy: timings are serialized *and* exclusive. A named Ray actor (`optistack-timing-lock`)
is a readers-writer lock: pass application, accuracy evaluation and first calls hold it shared (they
run in parallel), every timing phase (baseline, interleaved A/B samples, workload extras such as
TTFT) holds it exclusive, so while one trial is timed no other trial computes anything on the
cluster. Workers use every core torch sees, as a plain `optistack run` does.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Iterator

from ..core.deprecation import renamed
from ..core.errors import OptistackError
from .store import TrialRecord

LOCK_NAME = "optistack-timing-lock"
POLICY = ("serialized: a Ray named actor '" + LOCK_NAME + "' is a readers-writer lock; pass application "
          "and accuracy evaluation run in parallel, each timing phase (baseline, A/B samples, workload "
          "extras) runs alone, while no other trial computes")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptistackError("searching with workers > 1 or address= needs Ray: pip install 'optistack[ray]'") from None
    return ray


class TimingLockActor:
    """Readers-writer lock with writer preference (an async Ray actor: waiting costs no thread)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    async def acquire_shared(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_shared(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_exclusive(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True

    async def release_exclusive(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


class RayTimingLock:
    """A worker's view of the timing lock: `work()` shares it, `timing()` (even inside `work()`) owns it."""

    policy = POLICY

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._shared = False

    def _call(self, method: str) -> None:
        import ray

        ray.get(getattr(self.actor, method).remote())

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        self._call("acquire_shared")
        self._shared = True
        try:
            yield
        finally:
            if self._shared:
                self._shared = False
                self._call("release_shared")

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        held = self._shared
        if held:  # a reader cannot become the writer without letting go first
            self._shared = False
            self._call("release_shared")
        self._call("acquire_exclusive")
        try:
            yield
        finally:
            self._call("release_exclusive")
            if held:
                self._call("acquire_shared")
                self._shared = True


# names from before the timing lock was called a lock: they warn
_RENAMED = {"GateActor": "TimingLockActor", "RayGate": "RayTimingLock", "GATE_NAME": "LOCK_NAME"}


__getattr__ = renamed(__name__, _RENAMED, lambda new: globals()[new], " (a timing lock, not a gate)")


class TrialWorker:
    """A Ray actor holding one `TrialRunner`."""

    def __init__(self, workload: Any, timing: Any, lock: Any, cache_size: int, name: str) -> None:
        import torch

        from .trial import TrialRunner

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # Ray sets 1 thread per CPU it reserved
        self.runner = TrialRunner(workload, timing, lock=RayTimingLock(lock), cache_size=cache_size, name=name)

    def run(self, text: str, phase: str) -> TrialRecord:
        return self.runner.run(text, phase)


class RayExecutor:
    timing_policy = POLICY

    def __init__(self, workload: Any, timing: Any, workers: int, address: str | None, cache_size: int = 8) -> None:
        ray = self.ray = import_ray()
        self._started_ray = False
        if not ray.is_initialized():
            if address is not None:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
                self._started_ray = True
        lock = ray.remote(num_cpus=0)(TimingLockActor).options(name=LOCK_NAME, get_if_exists=True).remote()
        worker_cls = ray.remote(num_cpus=1)(TrialWorker)
        self.actors = [worker_cls.remote(workload, timing, lock, cache_size, f"ray-{i}") for i in range(workers)]
        self.capacity = workers
        self._idle = list(range(workers))
        self._ran: dict[int, set[str]] = {i: set() for i in range(workers)}
        self._running: dict[Any, tuple[int, str, str]] = {}

    def _pick(self, text: str) -> int:
        """The idle worker that holds the longest prefix of `text` in its cache."""
        def shared(i: int) -> int:
            return max((len(t) for t in self._ran[i] if text.startswith(t + ",")), default=0)

        best = max(self._idle, key=shared)
        self._idle.remove(best)
        return best

    def submit(self, text: str, phase: str) -> None:
        i = self._pick(text)
        self._running[self.actors[i].run.remote(text, phase)] = (i, text, phase)

    def wait(self) -> list[TrialRecord]:
        ready, _ = self.ray.wait(list(self._running), num_returns=1)
        out = []
        for ref in ready:
            i, text, phase = self._running.pop(ref)
            self._idle.append(i)
            try:
                record = self.ray.get(ref)
            except Exception as exc:  # the worker died: the trial failed, the search goes on
                record = TrialRecord.failed(text, f"Ray worker failed: {type(exc).__name__}: {exc}", phase=phase,
                                            worker=f"ray-{i}")
            self._ran[i].add(text)
            out.append(record)
        return out

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        if self._started_ray:
            self.ray.shutdown()
