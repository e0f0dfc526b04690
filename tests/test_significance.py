"""McNemar and the paired bootstrap against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from domaintune.evaluate import significance
from domaintune.evaluate.significance import mcnemar, paired_bootstrap_p


def pairs(both: int, only_base: int, only_tuned: int, neither: int) -> tuple[list[bool], list[bool]]:
    base = [True] * both + [True] * only_base + [False] * only_tuned + [False] * neither
    tuned = [True] * both + [False] * only_base + [True] * only_tuned + [False] * neither
    return base, tuned


def test_mcnemar_exact_for_few_discordant_pairs():
    # b=1, c=9: two-sided binomial, 2 * P(X <= 1 | n=10, p=1/2) = 2 * (1 + 10) / 1024
    result = mcnemar(*pairs(50, 1, 9, 5))
    assert (result["b"], result["c"], result["method"]) == (1, 9, "exact")
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert result["statistic"] == 1


def test_mcnemar_exact_one_sided_extreme():
    # b=0, c=6: 2 * (1/2)^6
    assert mcnemar(*pairs(10, 0, 6, 0))["p_value"] == pytest.approx(2 / 64)


def test_mcnemar_exact_balanced_is_one():
    assert mcnemar(*pairs(10, 3, 3, 4))["p_value"] == pytest.approx(1.0)


def test_mcnemar_chi_square_with_continuity_correction():
    # b=10, c=30: (|10 - 30| - 1)^2 / 40 = 361 / 40; chi-square(1) tail = erfc(sqrt(x / 2))
    result = mcnemar(*pairs(100, 10, 30, 20))
    assert result["method"] == "chi2"
    assert result["statistic"] == pytest.approx(361 / 40)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(361 / 80)))


def test_mcnemar_switches_at_25_discordant_pairs():
    assert mcnemar(*pairs(0, 12, 12, 0))["method"] == "exact"
    balanced = mcnemar(*pairs(0, 12, 13, 0))
    assert balanced["method"] == "chi2"
    assert balanced["statistic"] == 0.0 and balanced["p_value"] == 1.0  # the correction never overshoots


def test_mcnemar_without_discordant_rows():
    assert mcnemar(*pairs(5, 0, 0, 5)) == {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError):
        mcnemar([True, False], [True])


def test_bootstrap_identical_models_give_p_one():
    scores = np.random.default_rng(0).random(50)
    assert paired_bootstrap_p(scores, scores.copy()) == 1.0


def test_bootstrap_constant_gain_is_as_small_as_the_resamples_allow():
    base = np.random.default_rng(1).random(30)
    assert paired_bootstrap_p(base, base + 0.1, n_resamples=999) == pytest.approx(1 / 1000)


def test_bootstrap_two_rows_by_hand():
    # differences [1, 0], observed mean 0.5; resampled means are 0, 0.5, 1 with probabilities
    # 1/4, 1/2, 1/4, so the shifted means reach |0.5| half the time.
    assert paired_bootstrap_p([0, 0], [1, 0], n_resamples=20_000) == pytest.approx(0.5, abs=0.02)


def test_bootstrap_agrees_with_the_normal_approximation():
    # For continuous scores on a few hundred rows, the bootstrap should match the z-test on the mean.
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        base = rng.random(300)
        tuned = base + rng.normal(0.1, 1.0, 300)
        differences = tuned - base
        z = differences.mean() / (differences.std() / math.sqrt(differences.size))
        expected = math.erfc(abs(z) / math.sqrt(2))
        assert 0.01 < expected < 0.2  # a case where the test has something to decide
        assert paired_bootstrap_p(base, tuned, n_resamples=20_000) == pytest.approx(expected, rel=0.15)


def test_bootstrap_is_seeded_and_chunking_does_not_change_it(monkeypatch):
    rng = np.random.default_rng(4)
    base, tuned = rng.random(60), rng.random(60)
    first = paired_bootstrap_p(base, tuned, n_resamples=2000, seed=7)
    assert paired_bootstrap_p(base, tuned, n_resamples=2000, seed=7) == first
    monkeypatch.setattr(significance, "_RESAMPLE_CHUNK", 60 * 7)
    assert paired_bootstrap_p(base, tuned, n_resamples=2000, seed=7) == first


def test_bootstrap_length_mismatch():
    with pytest.raises(ValueError):
        paired_bootstrap_p([1, 0, 1], [1, 0])
