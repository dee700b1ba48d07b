import time

import pytest

from optistack.bench.timer import TimingConfig, interleaved


def test_interleaving_times_every_callable_each_round_and_stops_early_when_tight():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    cfg = TimingConfig(warmup=1, min_rounds=5, max_rounds=50, max_seconds=5, target_half_width=10.0)
    samples = interleaved(fns, cfg, compare=("a", "b"))
    assert len(samples["a"]) == len(samples["b"]) == 5  # a loose target stops at min_rounds
    assert calls[:2] == ["a", "b"]  # warm-up
    timed = calls[2:]
    assert timed[0:2] == ["a", "b"] and timed[2:4] == ["b", "a"]  # rotating start


def test_a_slower_callable_is_measured_slower():
    fns = {"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.004)}
    samples = interleaved(fns, TimingConfig(warmup=0, min_rounds=5, max_rounds=5))
    assert min(samples["slow"]) > max(samples["fast"])


def test_bad_timing_config_is_refused():
    with pytest.raises(ValueError, match="min_rounds"):
        TimingConfig(min_rounds=1)
