"""The instrument checked from outside: MiniLM eager vs the best chain (`@encoder-latency`), timed by
pytest-benchmark and by optistack's own benchmark instrument; the two speedups must agree within 5%.

Run: `pytest benchmarks/test_instrument_agreement.py --benchmark-only` (never part of `make test`).

Both timers time each model in blocks of consecutive calls and leave the first call after a switch of
model out of the speedup: pytest-benchmark runs an untimed warm-up call before each block of `ROUNDS`
timed calls, the instrument (`TimingConfig.block`) reports a block's first call apart
(`latency_ms.first_call_after_switch_ms`). So that slow drift of a shared machine does not decide the
comparison, pytest-benchmark's blocks alternate (eager, fast, eager, fast, ...) and its speedup is the
median of the per-pair ratios. Both timers see a fresh batch every call, made before the block
(pytest-benchmark's `pedantic(setup=...)` hands them out, not timed), as a real caller would. The
assertion is the benchmark's purpose (issue 16: "asserts they agree within 5%"); on a machine shared
with other jobs, rerun before trusting either number.

The two causes of the old 7-15% gap are switchable, to see each one: `AGREEMENT_BLOCK=1` (call-by-call
timing: every sample a first call after a switch, ~5% below the steady state for this chain) and
`AGREEMENT_ALLOCATOR=as-is` (glibc malloc's thresholds left to move with the process's history, so
the eager model's page faults, 0 to 18,000 a call, and its time drift between the instrument's
minutes and pytest-benchmark's). See docs/reports.md, "Checked from outside".
"""
from __future__ import annotations

import copy
import math
import os
import statistics

import pytest

import optistack as ost
from optistack.bench.timer import TimingConfig

# the best chain on this machine by default (issue 16: "agree within 5% on the best chain"); AGREEMENT_CHAIN=...
# for another, e.g. "cast{dtype=bf16},compile" (every pass of the chain must apply)
CHAIN = os.environ.get("AGREEMENT_CHAIN", "@encoder-latency")
PAIRS = 12  # alternating blocks per model: short blocks, so a shared machine's load changes little within a pair
ROUNDS = 5  # calls per block
TOLERANCE = 0.05
BLOCK = int(os.environ.get("AGREEMENT_BLOCK", 2))  # the instrument's default; AGREEMENT_BLOCK=1: call by call
ALLOCATOR = os.environ.get("AGREEMENT_ALLOCATOR", "steady")  # the instrument's default; "as-is": thresholds move

_medians: dict[str, list[float]] = {"eager": [], "fast": []}


@pytest.fixture(scope="module")
def setup():
    wl = ost.workloads.load("minilm")
    result = ost.Pipeline.parse(CHAIN).run(
        wl, timing=TimingConfig(warmup=3, min_rounds=20, max_rounds=60, max_seconds=60.0, block=BLOCK,
                                allocator=ALLOCATOR), verbose=False)
    not_applied = [s for s in result.report.steps if s.status != "applied"]
    if not_applied:
        pytest.skip(f"{CHAIN}: {not_applied[0].text} did not apply here: {not_applied[0].reason}")
    models = {"eager": copy.deepcopy(wl.model), "fast": result.model}
    counter = iter(range(10**9, 2 * 10**9))  # indices far from the instrument's, so never a repeat
    return wl, models, result.report, (lambda: wl.timing_batch(next(counter)))


def _call(wl, model):
    return lambda batch: wl.run(model, batch)


@pytest.mark.parametrize("label,pair", [(m, i) for i in range(PAIRS) for m in ("eager", "fast")])
def test_minilm_instrument_agrees_with_pytest_benchmark(benchmark, setup, label, pair):
    wl, models, report, fresh = setup
    run = _call(wl, models[label])
    # the block's batches are made first, as the instrument does, so no tokenizing runs between timed calls
    batches = [fresh() for _ in range(ROUNDS)]
    run(fresh())  # warm-up outside the measurement: the first call after the switch from the other model
    benchmark.group = "instrument agreement: minilm 8x128"
    benchmark.extra_info["pipeline"] = "identity" if label == "eager" else CHAIN
    benchmark.pedantic(run, setup=lambda: ((), {"batch": batches.pop()}), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    _medians[label].append(benchmark.stats.stats.median * 1000.0)  # ms
    if label != "fast" or pair != PAIRS - 1:
        return
    ratios = [e / f for e, f in zip(_medians["eager"], _medians["fast"])]
    independent = statistics.median(ratios)
    step = report.steps[-1]
    instrument = step.cumulative_speedup
    gap = abs(math.log(instrument / independent))
    lat = {"eager": report.baseline["latency_ms"], "fast": step.latency_ms}  # eager: its A/A copy, before the pipeline
    benchmark.extra_info.update(instrument_speedup=instrument, independent_speedup=independent,
                                independent_pair_ratios=ratios, gap=math.exp(gap) - 1, block=report.timing["block"],
                                instrument_ms={k: v["median"] for k, v in lat.items()},
                                instrument_first_after_switch_ms={k: v["first_call_after_switch_ms"] for k, v in lat.items()})
    faults = {k: v.get("page_faults_per_call") for k, v in lat.items()}
    benchmark.extra_info.update(allocator=report.timing["allocator"], instrument_page_faults_per_call=faults)
    print(f"\ninstrument {instrument:.3f}x (CI {[round(c, 3) for c in step.cumulative_ci95]}, block "
          f"{report.timing['block']}, allocator {ALLOCATOR}, page faults a call {faults}; "
          f"ms eager {lat['eager']['median']:.1f} (in the step's rounds ~"
          f"{instrument * lat['fast']['median']:.1f}) fast {lat['fast']['median']:.1f}, first after a "
          f"switch {lat['eager']['first_call_after_switch_ms']:.1f} / {lat['fast']['first_call_after_switch_ms']:.1f}) vs "
          f"pytest-benchmark {independent:.3f}x (ms eager {statistics.median(_medians['eager']):.1f} fast "
          f"{statistics.median(_medians['fast']):.1f}; pairs {[round(r, 3) for r in ratios]}): "
          f"gap {100 * (math.exp(gap) - 1):.1f}%")
    assert gap <= math.log(1 + TOLERANCE), (
        f"instrument {instrument:.3f}x vs pytest-benchmark {independent:.3f}x differ by more than "
        f"{TOLERANCE:.0%} (pairs {ratios}); on a shared machine rerun before trusting either")
