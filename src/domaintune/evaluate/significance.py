"""Is the tuned model better than the base on the same rows, or could the gap be chance?

Both tests are paired: each row is scored by both models, so what matters is where they differ.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

EXACT_BELOW = 25  # fewer discordant pairs than this and the chi-square approximation is poor

_RESAMPLE_CHUNK = 2_000_000  # indices drawn at a time, so large evaluations do not exhaust memory


def mcnemar(base_correct, tuned_correct) -> dict:
    """McNemar's test on per-row correctness of the two models.

    ``b`` counts rows only the base gets right, ``c`` rows only the tuned model gets right. With
    ``b + c < 25`` the p-value is the exact two-sided binomial test of ``b`` out of ``b + c`` at 0.5
    (``statistic`` is then ``min(b, c)``); otherwise ``statistic`` is the continuity-corrected
    chi-square ``(max(|b - c| - 1, 0))² / (b + c)`` with one degree of freedom. No discordant rows
    give p = 1. ``method`` says which test was used.
    """
    base = np.asarray(base_correct, dtype=bool)
    tuned = np.asarray(tuned_correct, dtype=bool)
    if base.shape != tuned.shape or base.ndim != 1:
        raise ValueError(f"base_correct and tuned_correct must be equally long, got {base.shape} and {tuned.shape}")
    b = int(np.sum(base & ~tuned))
    c = int(np.sum(~base & tuned))
    if b + c == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
    if b + c < EXACT_BELOW:
        p_value = stats.binomtest(b, b + c, 0.5).pvalue
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p_value), "method": "exact"}
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(stats.chi2.sf(statistic, df=1)),
            "method": "chi2"}


def paired_bootstrap_p(base_scores, tuned_scores, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided bootstrap p-value for "the mean of tuned − base per row is zero".

    Shift method: the per-row differences are resampled with replacement, and the resampled means
    are shifted by the observed mean so their distribution is centred on zero, as the null
    hypothesis says. The p-value is the share of shifted means at least as far from zero as the
    observed mean, counted as ``(k + 1) / (n_resamples + 1)`` so that it is never exactly zero
    (a finite number of resamples cannot prove that).
    """
    base = np.asarray(base_scores, dtype=float)
    tuned = np.asarray(tuned_scores, dtype=float)
    if base.shape != tuned.shape or base.ndim != 1 or base.size == 0:
        raise ValueError("paired_bootstrap_p needs two equally long, non-empty lists of per-row scores")
    differences = tuned - base
    observed = differences.mean()
    rng = np.random.default_rng(seed)
    n = differences.size
    chunk = max(1, _RESAMPLE_CHUNK // n)
    extreme = 0
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        means = differences[rng.integers(0, n, size=(size, n))].mean(axis=1)
        # A small tolerance so that rounding in the means does not decide ties with the observed value.
        extreme += int(np.sum(np.abs(means - observed) >= abs(observed) - 1e-12))
    return (extreme + 1) / (n_resamples + 1)
