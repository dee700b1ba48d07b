"""The search loop on a fake executor with known, noise-free numbers: what it proposes and returns."""
from __future__ import annotations

from collections import Counter

import pytest

import optistack
from optistack.search import driver
from optistack.search.store import TrialRecord, TrialStore

# Per pass: (speed factor, accuracy drop, size factor). A pipeline multiplies speeds and sizes, adds drops.
EFFECTS = {"identity": (1.0, 0.0, 1.0), "cast": (1.3, 0.002, 0.5), "int8-dynamic": (1.6, 0.006, 0.25),
           "prune-magnitude{sparsity=0.3}": (1.1, 0.003, 1.0), "rtn-int4": (2.5, 0.05, 0.15),
           "cast{dtype=fp16}": (1.2, 0.001, 0.5)}
CANDIDATES = ["identity", "cast{dtype=bf16|fp16}", "int8-dynamic", "prune-magnitude{sparsity=0.3}", "rtn-int4"]


def fake_report(text):
    speed, drop, size, steps = 1.0, 0.0, 1.0, []
    for part in text.split(","):
        s, d, z = EFFECTS[part]
        speed, drop, size = speed * s, drop + d, size * z
        steps.append({"pass": part.split("{")[0], "config": {}, "text": part, "status": "applied",
                      "cumulative_speedup": speed, "cumulative_ci95": [speed * 0.95, speed * 1.05],
                      "latency_ms": {"median": 10.0 / speed}, "model_bytes": int(1e6 * size), "extra": {},
                      "accuracy": {"drop_from_original": drop}})
    return {"baseline": {"model_bytes": 1_000_000, "extra": {}}, "steps": steps}


class FakeExecutor:
    capacity = 1
    timing_policy = "fake: no timing"
    runs: Counter = Counter()

    def __init__(self, *args, **kwargs):
        self.queue = []

    def submit(self, text, phase):
        self.queue.append((text, phase))

    def wait(self):
        text, phase = self.queue.pop(0)
        FakeExecutor.runs[text] += 1
        return [TrialRecord.from_report(text, fake_report(text), phase=phase)]

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    FakeExecutor.runs = Counter()
    monkeypatch.setattr(driver, "make_executor", lambda *a, **k: FakeExecutor())
    monkeypatch.setattr(driver, "resolve_workload", lambda spec: spec)
    return FakeExecutor


class Named:
    name = "fake"

    def describe(self):
        return {"model": "fake"}


def run(budget=20, **kw):
    kw.setdefault("verbose", False)
    return optistack.search(Named(), candidates=CANDIDATES, max_accuracy_drop=0.01, budget=budget, **kw)


@pytest.mark.parametrize("sampler", ["tpe", "grid", "random", "greedy"])
def test_finds_a_pipeline_at_least_as_fast_as_the_best_single_pass(fake, sampler):
    result = run(budget=14, sampler=sampler)
    singles = [t for t in EFFECTS]  # the greedy start runs every single pass first
    assert all(fake.runs[t] == 1 for t in singles)
    assert result.best_single.pipeline == "int8-dynamic"  # rtn-int4 is faster but over the budget
    assert result.best.speedup >= result.best_single.speedup
    assert result.best.speedup > 1.6  # int8-dynamic extended by cast/prune within the 1% budget
    assert result.best.max_step_drop <= 0.01
    assert optistack.Pipeline.parse(result.best_pipeline)  # runnable text
    assert max(fake.runs.values()) == 1
    assert len(result.records) == 14 or (sampler == "greedy" and result.stopped.startswith("nothing left"))


def test_a_stored_pipeline_is_never_run_again(fake, tmp_path):
    db = tmp_path / "s.db"
    first = run(budget=8, store=db)
    assert first.ran == 8
    second = run(budget=12, store=db)
    assert second.ran == 4 and second.reused == 8 and len(second.records) == 12
    assert max(fake.runs.values()) == 1
    third = run(budget=12, store=db)  # budget already spent: nothing runs
    assert third.ran == 0 and third.best_pipeline == second.best_pipeline
    stored = TrialStore(db).trials("fake:" + driver.workload_key(Named(), Named()).split(":")[1])
    assert len(stored) == 12 and len({r.pipeline for r in stored}) == 12
    assert sorted({r.session for r in stored}) == [1, 2]


def test_when_nothing_meets_the_budget_the_result_says_so(fake):
    result = optistack.search(Named(), candidates=["cast{dtype=bf16|fp16}", "rtn-int4"], max_accuracy_drop=0.0,
                              budget=5, verbose=False)
    assert not result.met_budget and result.best_pipeline is None
    kinds = result.best_of_each_kind()
    assert kinds["fastest"].pipeline.count("rtn-int4") == 1 and kinds["most accurate"].pipeline == "cast{dtype=fp16}"
    assert "No trial met the budget" in result.summary and "fastest" in result.summary
    assert len(result.pareto) >= 2  # the front is still shown


def test_a_trial_slower_than_the_original_is_never_best(fake, monkeypatch, tmp_path):
    """Under load int8-dynamic measured 0.78x and was called "best within budget": no longer."""
    monkeypatch.setitem(EFFECTS, "int8-dynamic", (0.78, 0.003, 0.25))
    monkeypatch.setitem(EFFECTS, "cast", (0.9, 0.002, 0.5))
    monkeypatch.setitem(EFFECTS, "identity", (1.0, 0.0, 1.0))  # a tie is not a win either
    result = optistack.search(Named(), candidates=["identity", "int8-dynamic", "cast", "rtn-int4"],
                              max_accuracy_drop=0.01, budget=8, verbose=False)
    assert result.met_budget and result.best is None and result.best_pipeline is None
    assert result.best_within_budget.pipeline == "identity"
    assert "No trial within max_accuracy_drop=0.01 beat the original model" in result.summary
    assert "median latency gain above 1.0x" in result.summary  # the rule, stated
    kinds = result.best_of_each_kind()
    assert kinds["fastest"].pipeline == "rtn-int4" and "best latency within budget" in kinds
    assert "fastest: 'rtn-int4'" in result.summary and "smallest" in result.summary
    assert all(cells[-1] != "best" for cells in result.pareto.rows())
    assert result.plot(tmp_path / "p.png").exists()  # no star, still a plot


def test_size_objective_needs_a_smaller_model(fake, monkeypatch):
    monkeypatch.setitem(EFFECTS, "cast", (1.3, 0.002, 1.0))  # faster, same size: no size win
    result = optistack.search(Named(), candidates=["identity", "cast"], max_accuracy_drop=0.01, objective="size",
                              budget=2, verbose=False)
    assert result.best_pipeline is None and "a model smaller than the original" in result.summary
    monkeypatch.setitem(EFFECTS, "cast", (0.9, 0.002, 0.5))  # slower but half the size: a size win
    again = optistack.search(Named(), candidates=["identity", "cast"], max_accuracy_drop=0.01, objective="size",
                             budget=2, verbose=False)
    assert again.best_pipeline == "cast"


def test_pareto_front_and_renderings(fake, tmp_path):
    result = run(budget=10)
    front = result.pareto
    assert result.best in list(front)
    for r in result.measured:  # every trial off the front is dominated by one on it
        if r not in list(front):
            assert any(q.speedup >= r.speedup and q.accuracy_drop <= r.accuracy_drop
                       and q.model_bytes <= r.model_bytes for q in front)
    md, html, text = front.to_markdown(), result._repr_html_(), str(result)
    assert result.best_pipeline in md and "<table>" in html and result.best_pipeline in text
    assert "best" in md.splitlines()[2 + list(front).index(result.best)]
    png = result.plot(tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_title_names_the_workload_and_labels_do_not_collide(fake):
    from optistack.search.render import pareto_figure

    result = run(budget=10)
    assert result.workload.startswith("fake:") and result.name == "fake"
    ax, key_ax = pareto_figure(result).axes
    title = ax.get_title()
    assert result.workload not in title and title.startswith("fake: latency search, max_accuracy_drop=0.01")
    labels = [t for t in ax.texts]  # front points carry numbers, staggered above and below
    assert [t.get_text() for t in labels] == [str(i) for i in range(1, len(result.pareto) + 1)]
    offsets = [t.xyann[1] for t in labels]
    assert all(a != b for a, b in zip(offsets, offsets[1:]))
    key = key_ax.texts[0].get_text().splitlines()
    assert [line.split()[1] for line in key] == [r.pipeline for r in result.pareto]


def test_bad_arguments_name_the_option(fake):
    with pytest.raises(optistack.OptistackError, match="objective must be one of latency"):
        run(objective="speed")
    with pytest.raises(optistack.OptistackError, match="sampler must be one of"):
        run(sampler="bayes")
    with pytest.raises(optistack.OptistackError, match="max_accuracy_drop"):
        optistack.search(Named(), candidates=CANDIDATES, max_accuracy_drop=-1)
    with pytest.raises(optistack.OptistackError, match="workers"):
        run(workers=0)


def test_greedy_extends_the_best_trial_that_can_be_extended(fake, monkeypatch):
    monkeypatch.setitem(EFFECTS, "compile", (3.0, 0.0, 1.0))  # fastest, but gives a compiled model
    result = optistack.search(Named(), candidates=["compile", "int8-dynamic", "cast"], max_accuracy_drop=0.01,
                              budget=20, sampler="greedy", verbose=False)
    ran = set(fake.runs)
    assert "int8-dynamic,compile" in ran and "int8-dynamic,cast" in ran  # compile itself takes no extension
    assert result.best_pipeline == "int8-dynamic,cast,compile"
