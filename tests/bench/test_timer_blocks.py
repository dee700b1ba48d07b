"""Block timing: consecutive calls of one model per round, balanced and shuffled across rounds, the first
call after a switch kept apart from the steady-state samples, and no batch ever timed twice on a model.

The clock is replaced by a deterministic one (a first call after a switch "takes" 100 ms, any other
10 ms), so what is asserted is the bookkeeping, never wall time.
"""
from __future__ import annotations

import pytest

from optistack.bench import timer
from optistack.bench.timer import TimingConfig, TimingConfigError, interleaved, latency_summary, round_orders


@pytest.fixture
def switch_clock(monkeypatch):
    """time_call that runs the call and reports 100 ms when the callable differs from the previous one."""
    state = {"last": None, "log": []}

    def fake_time_call(fn, device="cpu"):
        name = fn()
        state["log"].append(name)
        ms = 100.0 if state["last"] not in (None, name) else 10.0
        state["last"] = name
        return ms

    monkeypatch.setattr(timer, "time_call", fake_time_call)
    return state


def named(*names):
    return {n: (lambda *args, n=n: n) for n in names}


def runs(log):
    """[(name, length)] of consecutive calls of one callable."""
    out: list[list] = []
    for name in log:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return [tuple(r) for r in out]


def test_each_round_gives_every_callable_one_block_in_the_balanced_shuffled_order(switch_clock):
    cfg = TimingConfig(warmup=0, min_rounds=12, max_rounds=12, block=4)
    interleaved(named("o", "p", "c"), cfg, seed=5)
    log = switch_clock["log"]
    assert len(log) == 12 * 3 * 4
    blocks = [tuple(log[i:i + 4]) for i in range(0, len(log), 4)]
    assert all(len(set(b)) == 1 for b in blocks)  # four consecutive calls of one callable, never mixed
    owners = [b[0] for b in blocks]
    orders = round_orders(["o", "p", "c"], seed=5)
    assert owners == [name for _ in range(12) for name in next(orders)]  # the rounds follow round_orders
    rounds = [tuple(owners[i:i + 3]) for i in range(0, len(owners), 3)]  # two cycles of all six orders, reshuffled
    assert sorted(rounds[:6]) == sorted(rounds[6:]) and len(set(rounds)) == 6 and rounds[:6] != rounds[6:]


def test_the_first_call_after_a_switch_is_kept_apart_from_the_steady_samples(switch_clock):
    samples = interleaved(named("a", "b"), TimingConfig(warmup=1, min_rounds=10, max_rounds=10, block=3))
    for name in ("a", "b"):
        assert samples[name] == [10.0] * 10  # one steady sample per round: the switch cost never enters it
        assert samples.calls[name] == [10.0] * 20  # block - 1 steady calls per round
        assert samples.first_after_switch[name] and set(samples.first_after_switch[name]) == {100.0}
    # AB|BA keeps b running across the round boundary: such a block's first call is no switch, and is not counted
    switches = sum(1 for i, (n, _) in enumerate(runs(switch_clock["log"])) if i > 0)
    timed_switches = len(samples.first_after_switch["a"]) + len(samples.first_after_switch["b"])
    assert timed_switches <= switches and timed_switches < 20
    summary = latency_summary(samples, "a")
    assert summary["median"] == 10.0 and summary["n"] == 20 and summary["first_call_after_switch_ms"] == 100.0


def test_block_one_is_call_by_call_interleaving(switch_clock):
    samples = interleaved(named("a", "b"), TimingConfig(warmup=0, min_rounds=6, max_rounds=6, block=1))
    assert all(length == 1 or length == 2 for _, length in runs(switch_clock["log"]))  # AB|BA: at most two in a row
    assert len(samples["a"]) == len(samples.calls["a"]) == 6  # the only call of a block is its sample


def test_every_call_of_a_round_gets_its_own_fresh_batch_and_every_model_the_same_ones():
    made, seen = [], {"a": [], "b": []}

    def batches():
        made.append(len(made))
        return made[-1]

    fns = {"a": lambda x: seen["a"].append(x), "b": lambda x: seen["b"].append(x)}
    interleaved(fns, TimingConfig(warmup=1, min_rounds=3, max_rounds=3, block=3), batches=batches)
    assert made == list(range(12))  # (1 warm-up + 3 timed rounds) x 3 calls, one new batch each
    assert seen["a"] == seen["b"] == made  # same batches, same order; none twice on one model


def test_a_single_callable_never_switches():
    samples = interleaved(named("only"), TimingConfig(warmup=1, min_rounds=3, max_rounds=3, block=2))
    assert len(samples["only"]) == 3 and samples.first_after_switch["only"] == []
    assert latency_summary(samples, "only")["first_call_after_switch_ms"] is None


@pytest.mark.parametrize("bad", [0, -2, 65, 2.5, "3", True, None])
def test_a_bad_block_is_refused_with_what_would_be_valid(bad):
    with pytest.raises(TimingConfigError, match=r"block to be a whole number from 1 to 64.*got"):
        TimingConfig(block=bad)
