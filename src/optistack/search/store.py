"""The trial store: one SQLite file (WAL) where every finished trial is committed in its own transaction.

A search killed at any point loses only the trial it was running; restarted on the same file it reads
what is there and never runs a stored pipeline again. Trials are keyed by (workload, pipeline text),
not by search settings: they are measured without an accuracy gate, so a later search with another
budget or objective on the same workload reuses them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workload TEXT NOT NULL,
    started REAL NOT NULL,
    pid INTEGER NOT NULL,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workload TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    configs TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    speedup REAL,
    speedup_low REAL,
    speedup_high REAL,
    latency_ms REAL,
    accuracy_drop REAL,
    max_step_drop REAL,
    model_bytes INTEGER,
    extra TEXT NOT NULL,
    report TEXT NOT NULL,
    phase TEXT,
    worker TEXT,
    reused_prefix TEXT,
    session INTEGER REFERENCES sessions(id),
    seconds REAL,
    finished REAL NOT NULL,
    UNIQUE (workload, pipeline)
);
"""


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class TrialRecord:
    """One finished trial: the pipeline, what happened, and the numbers the search ranks on."""

    pipeline: str
    status: str  # "ok" (every step applied) | "rejected" | "failed" | "skipped"
    report: dict[str, Any]  # Report.to_dict()
    reason: str | None = None
    configs: list[dict[str, Any]] = field(default_factory=list)
    speedup: float | None = None  # final model vs the original, paired A/B
    speedup_ci95: tuple[float | None, float | None] = (None, None)
    latency_ms: float | None = None
    accuracy_drop: float | None = None  # final drop from the original; None when not finite
    max_step_drop: float | None = None  # the worst step's drop from the original: what a run gates on
    model_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
    phase: str = ""
    worker: str = ""
    reused_prefix: str = ""
    seconds: float | None = None
    session: int | None = None
    id: int | None = None

    @staticmethod
    def from_report(pipeline: str, report: dict[str, Any], **info: Any) -> "TrialRecord":
        steps = report.get("steps", [])
        bad = next((s for s in steps if s.get("status") != "applied"), None)
        last = steps[-1] if steps and bad is None else {}
        drops = [(s.get("accuracy") or {}).get("drop_from_original") for s in steps]
        finite_drops = [d for d in drops if _num(d) is not None]
        ci = last.get("cumulative_ci95") or [None, None]
        return TrialRecord(
            pipeline=pipeline, report=report,
            status=bad.get("status", "failed") if bad else ("ok" if steps else "failed"),
            reason=bad.get("reason") if bad else (None if steps else "no steps"),
            configs=[{"pass": s.get("pass"), "config": s.get("config", {})} for s in steps],
            speedup=_num(last.get("cumulative_speedup")), speedup_ci95=(_num(ci[0]), _num(ci[1])),
            latency_ms=_num((last.get("latency_ms") or {}).get("median")),
            accuracy_drop=_num((last.get("accuracy") or {}).get("drop_from_original")),
            max_step_drop=max(finite_drops) if bad is None and len(finite_drops) == len(steps) and steps else None,
            model_bytes=last.get("model_bytes"), extra=dict(last.get("extra") or {}), **info)

    @staticmethod
    def failed(pipeline: str, reason: str, **info: Any) -> "TrialRecord":
        """A trial that produced no report (the worker raised before measuring)."""
        return TrialRecord(pipeline=pipeline, status="failed", report={}, reason=reason, **info)

    @property
    def baseline(self) -> dict[str, Any]:
        return self.report.get("baseline") or {}


class TrialStore:
    """SQLite trial store. Cheap to open; the driver is its only writer."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path) if self.path else ":memory:", timeout=30.0,
                                  isolation_level=None)  # autocommit; transactions are explicit
        if self.path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across a killed process
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def start_session(self, workload: str, settings: dict[str, Any]) -> int:
        with self._transaction():
            cur = self.db.execute("INSERT INTO sessions (workload, started, pid, settings) VALUES (?, ?, ?, ?)",
                                  (workload, time.time(), os.getpid(), json.dumps(settings, default=str)))
        return int(cur.lastrowid)

    def add(self, workload: str, record: TrialRecord) -> TrialRecord:
        """Commit one finished trial (its own transaction); a pipeline already stored is an error."""
        row = (workload, record.pipeline, json.dumps(record.configs), record.status, record.reason,
               record.speedup, record.speedup_ci95[0], record.speedup_ci95[1], record.latency_ms,
               record.accuracy_drop, record.max_step_drop, record.model_bytes, json.dumps(record.extra),
               json.dumps(record.report, allow_nan=False), record.phase, record.worker, record.reused_prefix,
               record.session, record.seconds, time.time())
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO trials (workload, pipeline, configs, status, reason, speedup, speedup_low, "
                "speedup_high, latency_ms, accuracy_drop, max_step_drop, model_bytes, extra, report, phase, "
                "worker, reused_prefix, session, seconds, finished) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        record.id = int(cur.lastrowid)
        return record

    def trials(self, workload: str) -> list[TrialRecord]:
        rows = self.db.execute(
            "SELECT id, pipeline, configs, status, reason, speedup, speedup_low, speedup_high, latency_ms, "
            "accuracy_drop, max_step_drop, model_bytes, extra, report, phase, worker, reused_prefix, session, "
            "seconds FROM trials WHERE workload = ? ORDER BY id", (workload,)).fetchall()
        return [TrialRecord(id=r[0], pipeline=r[1], configs=json.loads(r[2]), status=r[3], reason=r[4],
                            speedup=r[5], speedup_ci95=(r[6], r[7]), latency_ms=r[8], accuracy_drop=r[9],
                            max_step_drop=r[10], model_bytes=r[11], extra=json.loads(r[12]),
                            report=json.loads(r[13]), phase=r[14] or "", worker=r[15] or "",
                            reused_prefix=r[16] or "", session=r[17], seconds=r[18]) for r in rows]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
