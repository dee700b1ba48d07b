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


def test_noise_floor_is_how_far_an_aa_ratio_strays_from_one():
    from optistack.bench.stats import Speedup, noise_floor

    assert noise_floor(Speedup(1.0, 1.0, 1.0)) == 0.0
    assert noise_floor(Speedup(0.986, 0.974, 0.997)) == pytest.approx(1 / 0.974 - 1)
    assert noise_floor(Speedup(1.01, 0.99, 1.03)) == pytest.approx(0.03)
    assert noise_floor(Speedup(float("nan"), 1.0, 1.0)) == float("inf")


def test_a_change_inside_the_noise_floor_is_no_measurable_change():
    from optistack.bench.stats import NO_CHANGE, Speedup, verdict

    slight = Speedup(0.986, 0.974, 0.997)  # excludes 1.0, but by less than the run's own A/A spread
    assert verdict(slight, floor=0.0) == "slower"
    assert verdict(slight, floor=0.027) == NO_CHANGE
    assert verdict(Speedup(1.5, 1.4, 1.6), floor=0.027) == "faster"
    assert verdict(Speedup(0.5, 0.45, 0.55), floor=0.027) == "slower"
    assert verdict(Speedup(1.05, 0.98, 1.12), floor=0.0) == NO_CHANGE  # CI holds 1.0
