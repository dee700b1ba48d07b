"""The instrument checked from outside: MiniLM eager vs the best chain, timed by pytest-benchmark and by
optistack's own benchmark instrument; the two speedups must agree within 5%.

Run: `pytest benchmarks/test_instrument_agreement.py --benchmark-only` (never part of `make test`).

pytest-benchmark times each model in blocks of its own, the instrument interleaves them; so that slow
drift of a shared machine does not decide the comparison, the blocks alternate (eager, fast, eager,
fast, ...) and the independent speedup is the median of the per-pair ratios. Both timers see a fresh
batch every call (pytest-benchmark through `pedantic(setup=...)`, not timed), as a real caller would.
"""
from __future__ import annotations

import copy
import math
import statistics

import pytest

import optistack as ost
from optistack.bench.timer import TimingConfig

CHAIN = "cast{dtype=bf16},compile"
PAIRS = 12  # alternating blocks per model: short blocks, so a shared machine's load changes little within a pair
ROUNDS = 5  # calls per block
TOLERANCE = 0.05

_medians: dict[str, list[float]] = {"eager": [], "fast": []}


@pytest.fixture(scope="module")
def setup():
    wl = ost.workloads.load("minilm")
    result = ost.Pipeline.parse(CHAIN).run(
        wl, timing=TimingConfig(warmup=3, min_rounds=20, max_rounds=60, max_seconds=60.0), verbose=False)
    step = result.report.steps[-1]
    if step.status != "applied":
        pytest.skip(f"{CHAIN} did not apply here: {step.reason}")
    models = {"eager": copy.deepcopy(wl.model), "fast": result.model}
    counter = iter(range(10**9, 2 * 10**9))  # indices far from the instrument's, so never a repeat
    return wl, models, result.report, (lambda: ((), {"batch": wl.timing_batch(next(counter))}))


def _call(wl, model):
    return lambda batch: wl.run(model, batch)


@pytest.mark.parametrize("label,pair", [(m, i) for i in range(PAIRS) for m in ("eager", "fast")])
def test_minilm_instrument_agrees_with_pytest_benchmark(benchmark, setup, label, pair):
    wl, models, report, fresh = setup
    run = _call(wl, models[label])
    run(**fresh()[1])  # warm-up outside the measurement (the models are warm; this refills caches)
    benchmark.group = "instrument agreement: minilm 8x128"
    benchmark.extra_info["pipeline"] = "identity" if label == "eager" else CHAIN
    benchmark.pedantic(run, setup=fresh, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    _medians[label].append(benchmark.stats.stats.median)
    if label != "fast" or pair != PAIRS - 1:
        return
    ratios = [e / f for e, f in zip(_medians["eager"], _medians["fast"])]
    independent = statistics.median(ratios)
    instrument = report.steps[-1].cumulative_speedup
    gap = abs(math.log(instrument / independent))
    benchmark.extra_info.update(instrument_speedup=instrument, independent_speedup=independent,
                                independent_pair_ratios=ratios, gap=math.exp(gap) - 1)
    print(f"\ninstrument {instrument:.3f}x (CI {report.steps[-1].cumulative_ci95}) vs pytest-benchmark "
          f"{independent:.3f}x (pairs {[round(r, 3) for r in ratios]}): gap {100 * (math.exp(gap) - 1):.1f}%")
    assert gap <= math.log(1 + TOLERANCE), (
        f"instrument {instrument:.3f}x vs pytest-benchmark {independent:.3f}x differ by more than "
        f"{TOLERANCE:.0%} (pairs {ratios}); on a shared machine rerun before trusting either")
