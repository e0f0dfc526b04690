"""Bootstrap intervals cover the true value about 95% of the time on data with a known answer."""

import numpy as np

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
    same = paired_intervals(base, base.copy())["difference"]
    assert same == [0.0, 0.0]
