"""A search killed with SIGKILL and restarted on the same store loses and re-runs no finished trial."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BUDGET = 10


def stored(db):
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT id, pipeline, session, report FROM trials ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []


def start(db):
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(HERE / "kill_resume_script.py"), str(db), str(BUDGET)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_restart_continues_where_it_stopped(tmp_path):
    db = tmp_path / "search.db"
    proc = start(db)
    deadline = time.monotonic() + 120
    while len(stored(db)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = stored(db)
    assert 3 <= len(before) < BUDGET, f"the search was not killed midway: {len(before)} trials"

    proc = start(db)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    after = stored(db)
    assert after[: len(before)] == before  # nothing finished was lost or rewritten
    assert len(after) == BUDGET and len({row[1] for row in after}) == BUDGET  # no pipeline ran twice
    assert {row[2] for row in before} == {1} and {row[2] for row in after[len(before):]} == {2}
    assert f"ran={BUDGET - len(before)} reused={len(before)} total={BUDGET}" in out
