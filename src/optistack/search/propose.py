"""Which pipeline to try next: a greedy start (every single pass, then extend the best), then Optuna.

Both read only finished trials (the store), so a restarted search proposes from where it stopped.
A proposer returns a pipeline text, `WAIT` (it needs a result still running) or None (nothing left).
"""
from __future__ import annotations

import random
from typing import Any

from ..core.errors import OptistackError
from .objective import INVALID_SCORE, meets_budget, score
from .space import END, SearchSpace

WAIT = "(wait)"
SAMPLERS = ("tpe", "grid", "random", "greedy")
_MAX_ASKS = 200  # sampled duplicates / invalid sequences in a row before falling back to an unseen pipeline


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise OptistackError("the search samplers need Optuna: pip install 'optistack[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class GreedyProposer:
    """Every single pass first; then the one-pass extensions of the best trial within budget that has
    any (`compile` gives a form nothing else takes, so the next best is extended), while untried."""

    phase = "greedy"

    def __init__(self, space: SearchSpace, objective: str, max_accuracy_drop: float, beam: int = 1) -> None:
        self.space, self.objective, self.max_drop, self.beam = space, objective, max_accuracy_drop, beam

    def next(self, done: dict[str, Any], pending: set[str]) -> str | None:
        singles = self.space.singles()
        for text in singles:
            if text not in done and text not in pending:
                return text
        if pending & set(singles):
            return WAIT
        feasible = [r for r in done.values() if meets_budget(r, self.max_drop) and self.space.extensions(r.pipeline)]
        feasible.sort(key=lambda r: score(r, self.objective, self.max_drop), reverse=True)
        waiting = False
        for record in feasible[: self.beam]:
            for text in self.space.extensions(record.pipeline):
                if text not in done and text not in pending:
                    return text
                waiting = waiting or text in pending
        return WAIT if waiting or pending else None


class OptunaProposer:
    """An Optuna study over pipeline positions (TPE, random) or over the listed pipelines (grid)."""

    def __init__(self, space: SearchSpace, sampler: str, objective: str, max_accuracy_drop: float,
                 seed: int = 0) -> None:
        optuna = import_optuna()
        self.optuna, self.space, self.phase = optuna, space, sampler
        self.objective, self.max_drop = objective, max_accuracy_drop
        self.rng = random.Random(seed)
        self._all: list[str] | None = None
        if sampler == "grid":
            self._all = list(space.enumerate())
            if len(self._all) >= 20000:
                raise OptistackError("the space is too large for sampler='grid'; use sampler='tpe' or lower max_length")
            chosen = optuna.samplers.GridSampler({"pipeline": self._all}, seed=seed)
        elif sampler == "tpe":
            chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
        else:
            chosen = optuna.samplers.RandomSampler(seed=seed)
        self.study = optuna.create_study(direction="maximize", sampler=chosen)
        self._open: dict[str, Any] = {}

    def _distributions(self, params: dict[str, str]) -> dict[str, Any]:
        dist = self.optuna.distributions.CategoricalDistribution
        if self.phase == "grid":
            return {"pipeline": dist(self._all)}
        return {k: dist(self.space.position_choices(int(k.split("_")[1]))) for k in params}

    def _params(self, text: str) -> dict[str, str]:
        return {"pipeline": text} if self.phase == "grid" else self.space.position_params(text)

    def observe(self, record: Any) -> None:
        """Feed a finished trial to the study (one the study asked for, or one from elsewhere)."""
        value = score(record, self.objective, self.max_drop)
        trial = self._open.pop(record.pipeline, None)
        if trial is not None:
            self._tell(trial, value)
        elif self.space.contains(record.pipeline) and (self._all is None or record.pipeline in self._all):
            params = self._params(record.pipeline)
            self.study.add_trial(self.optuna.trial.create_trial(
                params=params, distributions=self._distributions(params), value=value))

    def _tell(self, trial: Any, value: float | None) -> None:
        state = self.optuna.trial.TrialState
        try:
            if value is None:
                self.study.tell(trial, state=state.FAIL)
            else:
                self.study.tell(trial, value)
        except RuntimeError:  # GridSampler stops a finished grid, which only an optimize() loop allows
            pass

    def _suggest(self, trial: Any) -> str | None:
        if self.phase == "grid":
            return trial.suggest_categorical("pipeline", self._all)
        parts = []
        for i in range(self.space.max_length):
            choice = trial.suggest_categorical(f"step_{i}", self.space.position_choices(i))
            if choice == END:
                break
            parts.append(choice)
        return self.space.pipeline_text(parts)

    def next(self, done: dict[str, Any], pending: set[str]) -> str | None:
        for _ in range(_MAX_ASKS):
            trial = self.study.ask()
            text = self._suggest(trial)
            if text is None:
                self._tell(trial, INVALID_SCORE)
            elif text in done:  # never run twice: the stored result answers
                self._tell(trial, score(done[text], self.objective, self.max_drop))
            elif text in pending or text in self._open:
                self._tell(trial, None)
            else:
                self._open[text] = trial
                return text
        return self._unseen(done, pending)

    def _unseen(self, done: dict[str, Any], pending: set[str]) -> str | None:
        """The sampler keeps repeating itself: try a pipeline nobody has run, or report the space done."""
        if self._all is None:
            self._all = list(self.space.enumerate())
        left = [t for t in self._all if t not in done and t not in pending]
        return self.rng.choice(left) if left else None


class ChainedProposer:
    """Greedy until it has nothing left, then the sampler (if any)."""

    def __init__(self, greedy: GreedyProposer, sampler: OptunaProposer | None) -> None:
        self.greedy, self.sampler = greedy, sampler
        self.phase = greedy.phase

    def observe(self, record: Any) -> None:
        if self.sampler is not None:
            self.sampler.observe(record)

    def next(self, done: dict[str, Any], pending: set[str]) -> str | None:
        if self.phase == "greedy":
            text = self.greedy.next(done, pending)
            if text is not None:
                return text
            if self.sampler is None:
                return None
            self.phase = self.sampler.phase
        return self.sampler.next(done, pending) if self.sampler is not None else None


def make_proposer(space: SearchSpace, sampler: str, objective: str, max_accuracy_drop: float,
                  seed: int = 0) -> ChainedProposer:
    if sampler not in SAMPLERS:
        raise OptistackError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    greedy = GreedyProposer(space, objective, max_accuracy_drop)
    chained = None if sampler == "greedy" else OptunaProposer(space, sampler, objective, max_accuracy_drop, seed)
    return ChainedProposer(greedy, chained)
