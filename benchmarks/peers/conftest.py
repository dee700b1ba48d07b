"""Peer benchmarks: optistack side by side with another engine, in one run, on one machine.

Each peer is a test file (`test_llama_cpp.py`, ...) skipped with the reason where the peer is not
installed (`pip install 'optistack[peers]'`, or `make bench-peers`). They share:

- `peer_settings`: the comparison's shape (prompt tokens, new tokens, batch, threads, repeats), the
  same for every engine; environment overrides `OPTISTACK_PEER_THREADS`, `OPTISTACK_PEER_REPEATS`,
  `OPTISTACK_PEER_PIPELINE` (optistack's side, default the preset for the workload).
- `results_table(name, settings)`: a `ResultsTable` a test fills; at the end of the session every table
  is printed and written as JSON under `.benchmarks/peers/` (or `$OPTISTACK_PEERS_OUT`).
- `causal_lm_prompt`: the smollm2 workload's generation prompt (token ids) and its loaded workload.

Run with `pytest benchmarks/peers -s`; numbers are ratios measured side by side, never asserted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # peer_results and the runners beside this file

from peer_results import ResultsTable  # noqa: E402

_TABLES: list[ResultsTable] = []


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {raw!r}")
    return value


@pytest.fixture(scope="session")
def peer_settings() -> dict:
    """The comparison both engines run: batch 1, a 128-token prompt, 128 greedy new tokens, 2 threads."""
    return {"batch": 1, "prompt_tokens": 128, "new_tokens": 128,
            "threads": _env_int("OPTISTACK_PEER_THREADS", 2), "repeats": _env_int("OPTISTACK_PEER_REPEATS", 3)}


@pytest.fixture(scope="session")
def results_table():
    def make(name: str, settings: dict, columns: tuple[str, ...] = ("tokens_per_s", "ttft_ms")) -> ResultsTable:
        table = ResultsTable(name, dict(settings), columns)
        _TABLES.append(table)
        return table

    return make


@pytest.fixture(scope="session")
def causal_lm_prompt(peer_settings):
    """(workload, prompt ids 1 x prompt_tokens): the smollm2 workload loaded once for every LLM peer."""
    from optistack.workloads.smollm2 import SmolLM2Workload

    wl = SmolLM2Workload(prompt_tokens=peer_settings["prompt_tokens"], gen_tokens=peer_settings["new_tokens"])
    return wl, wl._gen_prompt


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for table in _TABLES:
        if not table.rows:
            continue
        path = table.write()
        terminalreporter.write_sep("=", f"peer comparison: {table.name}")
        terminalreporter.write_line(f"settings: {table.settings}")
        terminalreporter.write_line(table.markdown())
        terminalreporter.write_line(f"written: {path}")
