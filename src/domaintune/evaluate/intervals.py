"""95% confidence intervals for per-row scores, and for the paired base-vs-tuned difference.

A model's score that is all 0 or 1 per row (accuracy, exact match) is a proportion, and its
interval is Wilson's score interval: a bootstrap collapses to a point at the extremes, 30 rows all
right giving [1.000, 1.000] as if 30 rows proved perfection, where Wilson gives [0.886, 1.000].
Other scores (ROUGE-L) keep the percentile bootstrap. The paired difference stays a bootstrap of
the per-row differences: it is [0, 0] only when the two models score every row alike, which is
what it says (no row changed). Newcombe's interval for paired proportions was tried instead, and
is the wrong tool for the update gate's question: a candidate answering every row as a perfect
production does reached −0.026 on 144 rows, failing "at most 0.02 worse" with nothing forgotten.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def bootstrap_interval(scores, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``scores`` over rows resampled with replacement."""
    values = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _z(level: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``successes`` in ``n``."""
    if n == 0:
        return 0.0, 1.0
    z, p = _z(level), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at p = 0 or 1 one end is the proportion itself; computed, it is off by a rounding error
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def _binary(values: np.ndarray) -> bool:
    return bool(len(values)) and bool(np.all((values == 0) | (values == 1)))


def mean_interval(scores, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of per-row ``scores``: Wilson's for 0/1 scores, else the bootstrap's."""
    values = np.asarray(scores, dtype=float)
    if _binary(values):
        return wilson_interval(int(values.sum()), len(values))
    return bootstrap_interval(values, n_resamples, seed=seed)


def paired_intervals(base_scores, tuned_scores, n_resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """Intervals for base, tuned and tuned − base; the difference resamples the same rows for
    both models, which is what makes it narrower than the two separate intervals suggest."""
    base = np.asarray(base_scores, dtype=float)
    tuned = np.asarray(tuned_scores, dtype=float)
    return {
        "base": list(mean_interval(base, n_resamples, seed)),
        "tuned": list(mean_interval(tuned, n_resamples, seed)),
        "difference": list(bootstrap_interval(tuned - base, n_resamples, seed=seed)),
    }
