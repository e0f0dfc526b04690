"""The splits of ``data.split`` over numpy arrays of per-row values, for data too large to hold as
examples: each returns a boolean mask, True for the rows held out for evaluation.

The rules are those of ``data.split`` (same group sizes, same cut-off, at least one row on each
side where it can be); the seeded draws come from numpy's generator, so which rows are held out
differs from the list-based functions given the same seed, not how many.
"""

from __future__ import annotations

import numpy as np


def holdout_mask(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Hold out ``fraction`` of each label's rows (of all rows without labels): a label with at
    least two rows gives at least one and keeps at least one; a label of one row stays in train."""
    labels = np.zeros(n, dtype=np.int64) if labels is None else labels
    held = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            continue
        n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
        held[rng.choice(rows, size=n_eval, replace=False)] = True
    return held


def group_mask(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Hold out whole groups (``groups``: a hash of each row's group value), drawn in a seeded
    order, until about ``fraction`` of the rows are held out; the last group drawn always trains,
    and when every group would overshoot more than leaving it, the smallest is held out alone."""
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    held_groups = np.zeros(len(names), dtype=bool)
    if len(names) < 2:
        return np.zeros(len(groups), dtype=bool)
    target = fraction * len(groups)
    held = 0
    for group in np.random.default_rng(seed).permutation(len(names))[:-1].tolist():
        size = int(sizes[group])
        if held + size / 2 > target:
            continue  # taking this group would overshoot more than leaving it
        held_groups[group] = True
        held += size
        if held >= target:
            break
    if not held:
        held_groups[int(np.argmin(sizes))] = True
    return held_groups[inverse]


def time_mask(times: np.ndarray, fraction: float) -> np.ndarray:
    """Hold out the newest ``fraction`` of the rows; rows at the cut-off time stay together on
    the side that keeps eval nearer ``fraction``, unless that still holds out more than twice as
    many rows: then the newest ``fraction`` are taken exactly (ties in file order). When every
    row has the same time, none is held out (nothing older to train on)."""
    n = len(times)
    if n < 2:
        return np.zeros(n, dtype=bool)
    n_eval = min(n - 1, max(1, round(n * fraction)))
    cutoff = np.partition(times, n - n_eval)[n - n_eval]
    held, newer = times >= cutoff, times > cutoff
    if newer.any() and abs(int(newer.sum()) - n_eval) < abs(int(held.sum()) - n_eval):
        held = newer
    if held.all():  # every row has the same time: nothing older to train on
        return np.zeros(n, dtype=bool)
    if held.sum() > 2 * n_eval:
        held = np.zeros(n, dtype=bool)
        held[np.argsort(times, kind="stable")[n - n_eval:]] = True
    return held
