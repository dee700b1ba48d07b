"""A peer comparison's results: rows (engine, settings, numbers), ratios, printed as a table and written
as JSON with the machine's facts, so the numbers in the docs can be traced to a run."""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_ENV = "OPTISTACK_PEERS_OUT"  # a folder for the JSON files (default .benchmarks/peers)


def median_or_none(values: list[float]) -> float | None:
    good = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(good) if good else None


def _fmt(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "—"
    return f"{v:.0f}" if abs(v) >= 100 else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")


@dataclass
class ResultsTable:
    """One comparison (e.g. "llama-cpp"): its settings, one row per engine run, and the ratios."""

    name: str
    settings: dict[str, Any]
    columns: tuple[str, ...] = ("tokens_per_s", "ttft_ms")
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # anything more the JSON should carry (written when given)

    def add(self, engine: str, setting: str, **values: Any) -> dict[str, Any]:
        """A row: `engine` (who ran), `setting` (build, options), and the measured values (None: not
        measured; a `status` other than "ok" says why, e.g. "crashed (SIGSEGV)")."""
        row = {"engine": engine, "setting": setting, "status": values.pop("status", "ok"), **values}
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        head = ["engine", "setting", *self.columns, "status"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["engine"], f"`{r['setting']}`", *(_fmt(r.get(c)) for c in self.columns), r["status"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        for key, value in self.ratios.items():
            lines.append(f"\n{key}: {_fmt(value) if not isinstance(value, str) else value}")
        lines += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from optistack.bench.environment import machine_info, package_versions

        out = {"name": self.name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "settings": self.settings, "rows": self.rows, "ratios": self.ratios, "notes": self.notes,
               "machine": machine_info(), "versions": package_versions(), "load_average": _loadavg()}
        if self.details:
            out["details"] = self.details
        return out

    def write(self, folder: str | Path | None = None) -> Path:
        folder = Path(folder or os.environ.get(OUT_ENV) or ".benchmarks/peers")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path


def _loadavg() -> list[float] | None:
    """The 1/5/15-minute load: a shared machine shows here (the numbers are side by side, not alone)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None
