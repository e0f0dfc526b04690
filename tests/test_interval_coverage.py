"""The 95% intervals (bootstrap, Wilson) cover the true value about 95% of the time, on synthetic data whose
answer is known."""

from __future__ import annotations

import numpy as np

from domaintune.evaluate.intervals import bootstrap_interval, paired_intervals

TRIALS = 300


def test_the_interval_of_an_accuracy_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    truth = 0.8
    covered = 0
    for trial in range(TRIALS):
        correct = rng.random(300) < truth
        low, high = bootstrap_interval(correct, n_resamples=1000, seed=trial)
        covered += low <= truth <= high
    # binomial sd of the coverage over 300 trials is about 1.3 points; percentile bootstraps run a little narrow
    assert 0.90 <= covered / TRIALS <= 0.985


def test_the_paired_difference_covers_the_true_gain_and_is_narrower_than_the_separate_intervals():
    rng = np.random.default_rng(2)
    covered, narrower = 0, 0
    for trial in range(TRIALS):
        easy = rng.random(300)  # row difficulty shared by both models: what pairing removes
        base = easy < 0.7
        tuned = easy < 0.75  # tuned gets every row base gets, and 5% more: true gain 0.05
        noise = rng.random(300) < 0.1
        tuned = np.where(noise, rng.random(300) < 0.75, tuned)
        true_gain = 0.75 - 0.7
        intervals = paired_intervals(base, tuned, n_resamples=1000, seed=trial)
        low, high = intervals["difference"]
        covered += low <= true_gain <= high
        separate = (intervals["tuned"][1] - intervals["tuned"][0]) + (intervals["base"][1] - intervals["base"][0])
        narrower += (high - low) < separate
    assert 0.90 <= covered / TRIALS <= 0.985
    assert narrower == TRIALS


def test_a_wrong_answer_is_not_covered():
    rng = np.random.default_rng(3)
    intervals = [bootstrap_interval(rng.random(300) < 0.8, n_resamples=1000, seed=t) for t in range(50)]
    assert sum(low <= 0.7 <= high for low, high in intervals) <= 1  # 0.7 lies about 4 standard errors below 0.8
