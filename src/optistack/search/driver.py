"""`optistack.search(...)`: the loop that proposes pipelines, runs them, and commits each result.

The store is read first: a stored pipeline is never run again, and an integer budget counts the trials
already stored for this space, so a killed search restarted with the same arguments finishes the same
total. A time budget stops new trials after that much wall time of this call (running ones finish).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Sequence

from ..bench.gate import check_budget
from ..core.errors import OptistackError
from ..wiring import resolve_workload
from .executors import make_executor
from .objective import check_objective, parse_budget
from .propose import WAIT, make_proposer
from .result import SearchResult
from .space import SearchSpace, parse_candidates
from .store import TrialRecord, TrialStore

DEFAULT_MAX_LENGTH = 3


def search_timing() -> Any:
    """Shorter than a single run's default: many trials, each still interleaved A/B with a CI."""
    from ..bench.timer import TimingConfig

    return TimingConfig(warmup=2, min_rounds=8, max_rounds=30, max_seconds=10.0)


def workload_key(spec: Any, workload: Any) -> str:
    """Trials are stored per workload: its name, plus a fingerprint of `describe()` for objects."""
    if isinstance(spec, str):
        return spec
    described = json.dumps(workload.describe(), sort_keys=True, default=str)
    return f"{workload.name}:{hashlib.sha1(described.encode()).hexdigest()[:10]}"


def _check(max_accuracy_drop: Any, workers: Any, max_length: Any) -> None:
    check_budget(max_accuracy_drop, required=True)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise OptistackError(f"workers must be an integer >= 1; got {workers!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise OptistackError(f"max_length must be an integer >= 1; got {max_length!r}")


def search(workload: Any, candidates: str | Sequence[Any], *, max_accuracy_drop: float = 0.01,
           objective: str = "latency", budget: int | str = 20, store: Any = None, sampler: str = "tpe",
           max_length: int = DEFAULT_MAX_LENGTH, workers: int = 1, address: str | None = None,
           timing: Any = None, seed: int = 0, verbose: bool = True,
           on_trial: Callable[[TrialRecord], None] | None = None) -> SearchResult:
    """Search ordered subsets of `candidates` for the best `objective` within `max_accuracy_drop`.

    `workload`: a name ("minilm"), a workload object, or a zero-argument factory (Ray workers call it).
    `budget`: trials (20: stop when 20 trials of this space are stored, earlier runs included) or wall
    time ("10m"). `store`: SQLite path; None keeps trials in memory only. `sampler`: "tpe", "grid",
    "random" or "greedy" (single passes, then extensions of the best, and stop). `workers > 1` or
    `address=` runs trials on Ray. See docs/search.md.
    """
    check_objective(objective)
    _check(max_accuracy_drop, workers, max_length)
    plan = parse_budget(budget)
    space = SearchSpace(parse_candidates(candidates), max_length)
    proposer = make_proposer(space, sampler, objective, float(max_accuracy_drop), seed)
    local = workers == 1 and address is None
    resolved = resolve_workload(workload) if local or not isinstance(workload, str) else None
    key = workload_key(workload, resolved)
    trials = TrialStore(store)
    settings = {"candidates": space.texts, "objective": objective, "max_accuracy_drop": max_accuracy_drop,
                "budget": str(plan), "sampler": sampler, "max_length": max_length, "workers": workers}
    session = trials.start_session(key, settings)
    done = {r.pipeline: r for r in trials.trials(key)}
    for record in done.values():
        proposer.observe(record)
    reused = sum(1 for t in done if space.contains(t))
    timing = timing or search_timing()
    executor = make_executor(resolved if local else workload, timing, workers, address)
    from .progress import SearchProgress

    progress = SearchProgress(plan, objective, float(max_accuracy_drop), enabled=verbose)
    ran, started, pending = 0, time.monotonic(), {}
    stopped = "nothing left to try (the space is exhausted, or greedy found nothing to extend)"
    try:
        with progress:
            progress.start(sum(1 for t in done if space.contains(t)), done)
            while True:
                in_space = sum(1 for t in done if space.contains(t))
                if plan.trials is not None and in_space >= plan.trials:
                    stopped = f"the budget of {plan.trials} trials is spent"
                    if not pending:
                        break
                elif plan.seconds is not None and time.monotonic() - started >= plan.seconds:
                    stopped = f"the time budget of {plan} is spent"
                    if not pending:
                        break
                else:
                    room = plan.trials - in_space - len(pending) if plan.trials is not None else executor.capacity
                    if len(pending) < executor.capacity and room > 0:
                        text = proposer.next(done, set(pending))
                        if text is not None and text != WAIT:
                            pending[text] = proposer.phase
                            executor.submit(text, proposer.phase)
                            continue
                        if text is None and not pending:
                            break
                if not pending:
                    continue
                for record in executor.wait():
                    pending.pop(record.pipeline, None)
                    record.session = session
                    done[record.pipeline] = trials.add(key, record)
                    proposer.observe(record)
                    ran += 1
                    progress.update(record, done)
                    if on_trial is not None:
                        on_trial(record)
    finally:
        executor.close()
    records = [r for r in trials.trials(key) if space.contains(r.pipeline)]
    trials.close()
    return SearchResult(records=records, objective=objective, max_accuracy_drop=float(max_accuracy_drop),
                        budget=str(plan), timing_policy=executor.timing_policy, store=store, workload=key,
                        ran=ran, reused=reused, stopped=stopped, candidates=space.texts,
                        workload_name=getattr(resolved, "name", None) or key.split(":")[0])
