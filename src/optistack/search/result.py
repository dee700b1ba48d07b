"""What a search hands back: every trial, the Pareto front, the best pipeline, and why it stopped.

The front is over three axes: speed (the objective's gain; the speedup for objective "size"), accuracy
drop from the original, and model size. A trial is on it when no other trial is at least as good on
all three and better on one. Only trials whose every step applied take part.

`best_pipeline` is the best trial within the accuracy budget that also beats the original model
(`objective.beats_original`: gain above 1.0x, speedup CI not entirely at or below 1.0); otherwise None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .objective import beats_original, beats_rule, gain, meets_budget
from .store import TrialRecord

_WORST = float("inf")


@dataclass
class SearchResult:
    records: list[TrialRecord]
    objective: str
    max_accuracy_drop: float
    budget: str
    timing_policy: str
    store: Any
    workload: str
    ran: int  # trials run by this call
    reused: int  # trials of this space found in the store
    stopped: str
    candidates: list[str] = field(default_factory=list)
    workload_name: str = ""  # the workload's own name; `workload` is the store key (name:fingerprint)

    @property
    def name(self) -> str:
        """What to show people: the workload name, not the store key with its fingerprint."""
        return self.workload_name or self.workload

    def speed(self, record: TrialRecord) -> float | None:
        return record.speedup if self.objective == "size" else gain(record, self.objective)

    @property
    def measured(self) -> list[TrialRecord]:
        return [r for r in self.records if r.status == "ok" and self.speed(r) is not None]

    @property
    def within_budget(self) -> list[TrialRecord]:
        return [r for r in self.measured if meets_budget(r, self.max_accuracy_drop)
                and gain(r, self.objective) is not None]

    @property
    def met_budget(self) -> bool:
        return bool(self.within_budget)

    @property
    def best_within_budget(self) -> TrialRecord | None:
        """The highest gain within the accuracy budget, whether or not it beats the original."""
        ok = self.within_budget
        return max(ok, key=lambda r: gain(r, self.objective)) if ok else None

    @property
    def best(self) -> TrialRecord | None:
        """The best trial within budget that beats the original; None when no such trial exists."""
        ok = [r for r in self.within_budget if beats_original(r, self.objective)]
        return max(ok, key=lambda r: gain(r, self.objective)) if ok else None

    @property
    def best_pipeline(self) -> str | None:
        """Text `optistack run --pipeline` accepts unchanged; None when no trial within the budget beat
        the original model."""
        return self.best.pipeline if self.best else None

    @property
    def best_single(self) -> TrialRecord | None:
        singles = [r for r in self.within_budget if "," not in r.pipeline and len(r.configs) == 1]
        return max(singles, key=lambda r: gain(r, self.objective)) if singles else None

    def best_of_each_kind(self) -> dict[str, TrialRecord]:
        """Fastest, most accurate and smallest, budget or not: shown even when nothing met the budget."""
        out: dict[str, TrialRecord] = {}
        measured = self.measured
        if measured:
            out["fastest"] = max(measured, key=lambda r: self.speed(r) or 0.0)
            out["most accurate"] = min(measured, key=lambda r: _or_worst(r.accuracy_drop))
            out["smallest"] = min(measured, key=lambda r: _or_worst(r.model_bytes))
        if self.best_within_budget is not None:
            out[f"best {self.objective} within budget"] = self.best_within_budget
        return out

    @property
    def pareto(self) -> "ParetoTable":
        front = [r for r in self.measured if not any(_dominates(self, q, r) for q in self.measured)]
        front.sort(key=lambda r: -(self.speed(r) or 0.0))
        return ParetoTable(self, front)

    @property
    def summary(self) -> str:
        lines = [f"{len(self.records)} trials of {self.name} ({self.ran} run now, {self.reused} from the store); "
                 f"stopped: {self.stopped}.", f"Timing: {self.timing_policy}."]
        budget = f"max_accuracy_drop={self.max_accuracy_drop:g}"
        if self.best is not None:
            lines.append(f"Best {self.objective} within {budget} that beats the original (gain > 1.0x): "
                         f"{gain(self.best, self.objective):.2f}x with '{self.best.pipeline}'.")
            single = self.best_single
            if single is not None:
                lines.append(f"Best single pass: {gain(single, self.objective):.2f}x with '{single.pipeline}'.")
            return "\n".join(lines)
        if self.met_budget:
            lines.append(f"No trial within {budget} beat the original model: best_pipeline is None (the best "
                         f"needs {beats_rule(self.objective)}); keep the original. The best of each kind:")
        else:
            lines.append(f"No trial met the budget {budget}; the best of each kind regardless of the budget:")
        for kind, r in self.best_of_each_kind().items():
            lines.append(f"  {kind}: '{r.pipeline}' ({_short(self, r)})")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: every measured trial as speed vs accuracy drop (marker area ~ size), the front joined."""
        from .render import plot_search

        return plot_search(self, path)

    def to_markdown(self) -> str:
        return f"{self.summary}\n\n{self.pareto.to_markdown()}"

    def _repr_html_(self) -> str:
        from .render import escape

        summary = "<br>".join(escape(line) for line in self.summary.splitlines())
        return f"<div><p>{summary}</p>{self.pareto._repr_html_()}</div>"

    def print(self, console: Any = None) -> None:
        from .render import print_search

        print_search(self, console)

    def __str__(self) -> str:
        return f"{self.summary}\n\n{self.pareto}"

    def __repr__(self) -> str:
        return f"<SearchResult {len(self.records)} trials, best_pipeline={self.best_pipeline!r}>"


class ParetoTable:
    """The Pareto front as rows; prints as text, renders in Jupyter, exports markdown."""

    COLUMNS = ("pipeline", "speed", "accuracy drop", "size MB", "within budget", "")

    def __init__(self, result: SearchResult, records: list[TrialRecord]) -> None:
        self.result, self.records = result, records

    def rows(self) -> list[list[str]]:
        from .render import row_cells

        return [row_cells(self.result, r) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def to_markdown(self) -> str:
        from .render import markdown_table

        return markdown_table(self.COLUMNS, self.rows())

    def _repr_html_(self) -> str:
        from .render import html_table

        return html_table(self.COLUMNS, self.rows())

    def __str__(self) -> str:
        from .render import text_table

        return text_table(self.COLUMNS, self.rows())

    def __repr__(self) -> str:
        return str(self)


def _or_worst(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else _WORST


def _dominates(result: SearchResult, q: TrialRecord, r: TrialRecord) -> bool:
    a = (-(result.speed(q) or 0.0), _or_worst(q.accuracy_drop), _or_worst(q.model_bytes))
    b = (-(result.speed(r) or 0.0), _or_worst(r.accuracy_drop), _or_worst(r.model_bytes))
    return all(x <= y for x, y in zip(a, b)) and a != b


def _short(result: SearchResult, r: TrialRecord) -> str:
    from .render import row_cells

    cells = row_cells(result, r)
    return f"speed {cells[1]}, accuracy drop {cells[2]}, {cells[3]} MB"
