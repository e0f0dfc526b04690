"""95% bootstrap confidence intervals for per-row scores, and for the paired base-vs-tuned difference."""

from __future__ import annotations

import numpy as np


def bootstrap_interval(scores, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``scores`` over rows resampled with replacement."""
    values = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_intervals(base_scores, tuned_scores, n_resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """Intervals for base, tuned and tuned − base; the difference resamples the same rows for
    both models, which is what makes it narrower than the two separate intervals suggest."""
    base = np.asarray(base_scores, dtype=float)
    tuned = np.asarray(tuned_scores, dtype=float)
    return {
        "base": list(bootstrap_interval(base, n_resamples, seed=seed)),
        "tuned": list(bootstrap_interval(tuned, n_resamples, seed=seed)),
        "difference": list(bootstrap_interval(tuned - base, n_resamples, seed=seed)),
    }
