import numpy as np
import pytest

from optistack.bench.stats import paired_speedup, summarize


def test_summary_percentiles_and_cv():
    s = summarize([10.0] * 98 + [20.0, 30.0])
    assert s.median == 10.0 and s.p99 > 19.0 and s.n == 100
    assert s.noisy is False or s.cv > 0.10
    assert summarize([5, 5, 5]).cv == 0.0


def test_paired_speedup_recovers_a_known_ratio_and_cancels_shared_drift():
    rng = np.random.default_rng(1)
    drift = np.linspace(1.0, 1.6, 40)  # the machine slows down during the run
    base = 100 * drift * rng.normal(1, 0.02, 40)
    cand = 50 * drift * rng.normal(1, 0.02, 40)
    sp = paired_speedup(base, cand)
    assert sp.contains(2.0) and sp.low > 1.9 and sp.high < 2.1


def test_equal_distributions_give_a_ci_around_one():
    rng = np.random.default_rng(2)
    a, b = rng.normal(100, 5, 60), rng.normal(100, 5, 60)
    sp = paired_speedup(a, b)
    assert sp.contains(1.0) and sp.half_width < 0.05


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        paired_speedup([1, 2], [1])
    with pytest.raises(ValueError):
        summarize([])
