"""A real search on a tiny MLP: trials measured, prefixes reused, the best text runs unchanged."""
from __future__ import annotations

import sqlite3

from search_helpers import CANDIDATES, FAST

import optistack
from optistack.search.driver import workload_key
from optistack.search.objective import beats_original


def test_real_search_stores_every_trial_and_reuses_prefixes(tiny_workload, tmp_path):
    db = tmp_path / "search.db"
    result = optistack.search(tiny_workload, candidates=CANDIDATES, max_accuracy_drop=0.05, budget=9, store=db,
                              timing=FAST, verbose=False)
    assert len(result.records) == 9 and result.ran == 9
    assert {r.status for r in result.records} <= {"ok", "rejected", "failed", "skipped"}
    longer = [r for r in result.records if "," in r.pipeline]
    greedy_extensions = [r for r in longer if r.phase == "greedy"]  # extend a trial just run: its model is cached
    assert greedy_extensions and all(r.reused_prefix for r in greedy_extensions)
    assert all(r.pipeline.startswith(r.reused_prefix + ",") for r in longer if r.reused_prefix)
    for r in longer:  # the report repeats the prefix's steps and measures the new one against the original
        assert [s["text"] for s in r.report["steps"]] == r.pipeline.split(",")
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = con.execute("SELECT pipeline, status, report FROM trials").fetchall()
    assert len(rows) == 9 and all('"schema": "optistack.report/1"' in r[2] for r in rows)
    assert workload_key(tiny_workload, tiny_workload).startswith("tiny-mlp:")
    chosen = result.best_within_budget  # on a tiny MLP, nothing may beat the original: then best_pipeline is None
    assert chosen is not None
    assert result.best_pipeline is None or beats_original(result.best, "latency")
    rerun = optistack.Pipeline.parse(chosen.pipeline).run(tiny_workload, max_accuracy_drop=0.05, timing=FAST,
                                                          verbose=False)
    assert str(rerun.pipeline) == chosen.pipeline
    assert "sequential" in result.summary  # the timing policy is reported
