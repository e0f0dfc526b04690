"""Intervals cover the true value about 95% of the time on data with a known answer, and do not
collapse to a point where a bootstrap does."""

import numpy as np
import pytest

from domaintune.evaluate.intervals import bootstrap_interval, paired_intervals


def test_interval_coverage_on_known_accuracy():
    rng = np.random.default_rng(1)
    p, n, trials = 0.8, 200, 300
    covered = 0
    for t in range(trials):
        lo, hi = bootstrap_interval(rng.random(n) < p, n_resamples=500, seed=t)
        covered += lo <= p <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_paired_difference_excludes_zero_only_for_a_real_gain():
    rng = np.random.default_rng(2)
    base = rng.random(300) < 0.6
    better = base | (rng.random(300) < 0.5)  # fixes about half of the base's errors
    assert paired_intervals(base, better)["difference"][0] > 0
    assert paired_intervals(base, base.copy())["difference"] == [0.0, 0.0]  # no row changed


def test_a_perfect_score_on_few_rows_is_not_a_proof_of_perfection():
    from domaintune.evaluate.intervals import mean_interval, wilson_interval

    assert bootstrap_interval([1] * 30) == (1.0, 1.0)  # what reports showed before: 30 rows, "certainly 1.000"
    low, high = mean_interval([1] * 30)
    assert high == 1.0 and low == wilson_interval(30, 30)[0] and 0.88 < low < 0.89  # Wilson: [0.886, 1]
    assert mean_interval([0] * 12) == (0.0, wilson_interval(0, 12)[1]) and 0.24 < mean_interval([0] * 12)[1] < 0.25
    both_right = paired_intervals([1] * 30, [1] * 30)
    assert both_right["tuned"] == [low, 1.0] and both_right["difference"] == [0.0, 0.0]
    continuous = paired_intervals([0.2, 0.5, 0.9, 0.4], [0.3, 0.5, 1.0, 0.6])  # ROUGE-L-like: still bootstrapped
    assert continuous["tuned"] == list(bootstrap_interval([0.3, 0.5, 1.0, 0.6]))


def test_wilson_against_values_worked_out_by_hand():
    from domaintune.evaluate.intervals import wilson_interval

    # 15 of 30: centre 0.5, half-width z/(1+z²/n)·sqrt(0.25/30 + z²/3600) with z = 1.959964
    low, high = wilson_interval(15, 30)
    assert (low, high) == pytest.approx((0.33154, 0.66846), abs=1e-5)
