import itertools
import time

import numpy as np
import pytest

from optistack.bench.timer import TimingConfig, interleaved, round_orders, rounds_for_noise


def test_every_callable_is_timed_each_round_and_a_loose_target_stops_at_min_rounds():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    cfg = TimingConfig(warmup=1, min_rounds=5, max_rounds=50, max_seconds=5, target_half_width=10.0, block=1)
    samples = interleaved(fns, cfg, compare=("a", "b"))
    assert len(samples["a"]) == len(samples["b"]) == 5
    assert sorted(calls[:2]) == ["a", "b"]  # warm-up is interleaved too: both warmed alike
    rounds = [tuple(calls[i:i + 2]) for i in range(2, len(calls), 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds)


def test_orders_are_balanced_blocks_of_every_permutation():
    names = ["o", "p", "c"]
    orders = round_orders(names, seed=3)
    for _ in range(3):  # each block of 6 rounds holds all 6 orders once
        block = {tuple(next(orders)) for _ in range(6)}
        assert block == set(itertools.permutations(names))
    two = round_orders(["a", "b"], seed=0)
    firsts = [next(two)[0] for _ in range(40)]
    assert firsts.count("a") == firsts.count("b") == 20  # AB and BA equally often


def test_each_round_gets_a_fresh_batch_shared_by_every_callable():
    made, seen = [], {"a": [], "b": []}

    def batches():
        made.append(len(made))
        return made[-1]

    fns = {"a": lambda x: seen["a"].append(x), "b": lambda x: seen["b"].append(x)}
    interleaved(fns, TimingConfig(warmup=2, min_rounds=4, max_rounds=4, block=1), batches=batches)
    assert made == list(range(6))  # 2 warm-up rounds + 4 timed rounds, one batch each
    assert seen["a"] == seen["b"] == list(range(6))


def test_a_slower_callable_is_measured_slower():
    fns = {"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.02)}
    samples = interleaved(fns, TimingConfig(warmup=0, min_rounds=7, max_rounds=7))
    assert np.median(samples["slow"]) > np.median(samples["fast"])  # medians: a loaded machine oversleeps at times


def test_noisier_pairs_need_more_rounds():
    rng = np.random.default_rng(0)
    base = 10 * np.ones(20)
    quiet = rounds_for_noise(list(base), list(base * rng.normal(1, 0.005, 20)), 0.02)
    noisy = rounds_for_noise(list(base), list(base * rng.normal(1, 0.08, 20)), 0.02)
    assert quiet <= 3 < 20 < noisy


def test_bad_timing_config_is_refused():
    with pytest.raises(ValueError, match="min_rounds"):
        TimingConfig(min_rounds=1)
    with pytest.raises(ValueError, match="target_half_width"):
        TimingConfig(target_half_width=0)
