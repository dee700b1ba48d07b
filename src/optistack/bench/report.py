"""The report: what each pass did, measured. Its JSON form (schema `optistack.report/1`) is public.

Renderers (terminal, markdown, HTML, PNG) live in `bench.render` and read only this data model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.outcome import STATUSES  # noqa: F401  (one list of step statuses: the runner's)

SCHEMA = "optistack.report/1"


@dataclass
class Accuracy:
    metric: str
    before: float
    after: float
    higher_is_better: bool
    drop: float  # from the step before, in the metric's scale (positive = worse)
    drop_from_original: float
    extra: dict[str, float] = field(default_factory=dict)  # other metrics the workload reported

    @property
    def delta(self) -> float:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta"] = self.delta
        return d


@dataclass
class Step:
    pass_name: str
    config: dict[str, Any]
    text: str  # the pass in pipeline syntax
    status: str = "applied"
    reason: str | None = None
    modified: bool | None = None
    speedup: dict[str, Any] | None = None  # {"median", "ci95": [lo, hi]} vs the model before the step
    cumulative_speedup: float | None = None
    cumulative_ci95: list[float] | None = None
    latency_ms: dict[str, Any] | None = None
    accuracy: Accuracy | None = None
    peak_memory_bytes: int | None = None
    model_bytes: int | None = None
    apply_seconds: float | None = None
    peak_rss_bytes: int | None = None  # the process's resident high-water mark (VmHWM) when the step ended
    first_call_ms: float | None = None  # includes compilation for lazily compiled forms
    extra: dict[str, Any] = field(default_factory=dict)  # workload extras: TTFT, tokens/s, ... (+ raw "samples")
    info: dict[str, Any] = field(default_factory=dict)  # what the pass said it did
    traceback: str | None = None  # a failed step's exception type, message and traceback

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pass"] = d.pop("pass_name")
        d["accuracy"] = self.accuracy.to_dict() if self.accuracy else None
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Step":
        d = dict(d)
        d["pass_name"] = d.pop("pass")
        acc = d.get("accuracy")
        if acc is not None:
            acc = dict(acc)
            acc.pop("delta", None)
            for key in ("before", "after"):  # JSON null stands for a non-finite score
                acc[key] = math.nan if acc.get(key) is None else acc[key]
            for key in ("drop", "drop_from_original"):  # inf, not nan: a re-gate must still reject
                acc[key] = math.inf if acc.get(key) is None else acc[key]
            d["accuracy"] = Accuracy(**acc)
        known = {f.name for f in fields(Step)}
        return Step(**{k: v for k, v in d.items() if k in known})


@dataclass
class Report:
    workload: dict[str, Any]
    pipeline: str
    machine: dict[str, Any]
    versions: dict[str, str]
    baseline: dict[str, Any]  # {"latency_ms": {...}, "accuracy": {...}, "model_bytes", "extra"}
    steps: list[Step] = field(default_factory=list)
    max_accuracy_drop: float | None = None
    git_commit: str | None = None
    created: str | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # the pipeline text as written when it named a preset; `pipeline` is its expansion
    scenario: dict[str, Any] | None = None  # `run --scenario server`: serving.ScenarioResult.to_dict() (optistack.scenario/1)
    schema: str = SCHEMA

    @property
    def final_speedup(self) -> float | None:
        applied = [s for s in self.steps if s.status == "applied" and s.cumulative_speedup is not None]
        return applied[-1].cumulative_speedup if applied else 1.0

    @property
    def headline(self) -> dict[str, Any]:
        """The numbers to quote, vs the original: latency speedup, and for causal LMs decode tokens/s and
        TTFT ratios with CIs (`bench.headline`). Derived, so JSON carries it but loading ignores it."""
        from .headline import headline

        return headline(self)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "steps"}
        d["steps"] = [s.to_dict() for s in self.steps]
        d["headline"] = self.headline
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Report":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not an optistack report: schema is {d.get('schema')!r}, expected {SCHEMA!r}")
        known = {f.name for f in fields(Report)}
        kwargs = {k: v for k, v in d.items() if k in known and k != "steps"}
        return Report(steps=[Step.from_dict(s) for s in d.get("steps", [])], **kwargs)

    @staticmethod
    def load(path: str | Path) -> "Report":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no report at {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
        return Report.from_dict(data)

    # Renderers are imported lazily so `import optistack` stays free of rich/matplotlib.
    def to_markdown(self) -> str:
        from .render.markdown import render_markdown

        return render_markdown(self)

    def _repr_html_(self) -> str:
        from .render.html import render_html

        return render_html(self)

    def print(self, console: Any = None) -> None:
        from .render.terminal import print_report

        print_report(self, console=console)

    def plot(self, path: str | Path, axis: str | None = None) -> Path:
        """PNG of speed against accuracy lost; `axis` is "latency", "decode" (tokens/s) or "ttft"
        (default: decode for a causal LM that measured it, else latency)."""
        from .render.plot import plot_report

        return plot_report(self, path, axis=axis)

    def __str__(self) -> str:
        from .render.terminal import render_text

        return render_text(self)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null (a wrecked model's accuracy) rather than fail."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
