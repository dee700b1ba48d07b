"""Objectives are gains over the original; anything within the budget outranks anything outside it."""
import pytest

from optistack.core.errors import OptistackError
from optistack.search.objective import Budget, beats_original, gain, parse_budget, score
from optistack.search.store import TrialRecord


def record(speedup=2.0, drop=0.01, size=500, status="ok", extra=None, base_extra=None, ci=(None, None)):
    return TrialRecord(pipeline="x", status=status, report={"baseline": {"model_bytes": 1000, "extra": base_extra or {}}},
                       speedup=speedup, max_step_drop=drop, accuracy_drop=drop, model_bytes=size, extra=extra or {},
                       speedup_ci95=ci)


def test_gains_per_objective():
    r = record(extra={"ttft_ms": 50.0, "tokens_per_s": 30.0}, base_extra={"ttft_ms": 100.0, "tokens_per_s": 10.0})
    assert gain(r, "latency") == 2.0 and gain(r, "size") == 2.0
    assert gain(r, "ttft") == 2.0 and gain(r, "throughput") == 3.0
    assert gain(record(), "throughput") == 2.0  # no tokens/s: items per second, i.e. the speedup
    assert gain(record(), "ttft") is None and gain(record(status="failed"), "latency") is None


def test_score_puts_the_budget_first():
    within, slow_within = record(2.0, 0.01), record(1.1, 0.0)
    over, far_over = record(9.0, 0.02), record(9.0, 0.5)
    ranked = sorted([over, slow_within, far_over, within, record(status="failed")],
                    key=lambda r: score(r, "latency", 0.01), reverse=True)
    assert ranked[:4] == [within, slow_within, over, far_over]


def test_budget_parsing():
    assert parse_budget(20) == Budget(trials=20) and parse_budget("20") == Budget(trials=20)
    assert parse_budget("90s") == Budget(seconds=90) and parse_budget("10m") == Budget(seconds=600)
    assert parse_budget("1.5h") == Budget(seconds=5400)
    for bad in (0, "ten", "5d", True, 2.5):
        with pytest.raises(OptistackError, match="budget"):
            parse_budget(bad)


def test_only_a_gain_above_one_beats_the_original():
    assert beats_original(record(1.2, ci=(1.05, 1.3)), "latency")
    assert beats_original(record(1.02, ci=(0.95, 1.1)), "latency")  # median above 1, CI straddles 1: allowed
    assert not beats_original(record(0.78, ci=(0.7, 0.85)), "latency")  # the loaded-machine int8-dynamic case
    assert not beats_original(record(1.0, ci=(0.98, 1.02)), "latency")  # a tie is not a win
    assert not beats_original(record(1.01, ci=(0.9, 1.0)), "latency")  # the whole CI at or below 1
    assert not beats_original(record(1.01, ci=(0.9, 1.0)), "throughput")  # throughput without tokens/s = speedup
    tps = dict(extra={"tokens_per_s": 12.0}, base_extra={"tokens_per_s": 10.0})
    assert beats_original(record(0.9, ci=(0.8, 0.95), **tps), "throughput")  # tokens/s ratio 1.2, no CI of its own
    assert beats_original(record(0.5, size=999), "size") and not beats_original(record(3.0, size=1000), "size")
    assert not beats_original(record(3.0, extra={"ttft_ms": 100.0}, base_extra={"ttft_ms": 90.0}), "ttft")
    assert not beats_original(record(status="failed"), "latency")
