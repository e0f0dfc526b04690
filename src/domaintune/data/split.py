"""Hold out evaluation rows when a recipe has no eval file: seeded and stratified by label
(``holdout_split``), by group (``group_split``) or by time (``time_split``)."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def holdout_split(
    items: Sequence[T], fraction: float, seed: int, key: Callable[[T], object] | None = None
) -> tuple[list[T], list[T]]:
    """Split ``items`` into (train, eval) with ``fraction`` of each ``key`` group held out.

    Each group with at least two items gives at least one item to eval and keeps at least one
    for training; a group of one stays in train, so every eval label was seen in training.
    The result depends only on the items' order, ``fraction`` and ``seed``.
    """
    groups: dict[object, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[key(item) if key else None].append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for group_key in sorted(groups, key=str):
        indices = groups[group_key]
        if len(indices) < 2:
            continue
        rng.shuffle(indices)
        n_eval = min(len(indices) - 1, max(1, round(len(indices) * fraction)))
        held.update(indices[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held]
    evaluation = [item for i, item in enumerate(items) if i in held]
    return train, evaluation


def group_split(
    items: Sequence[T], fraction: float, seed: int, group: Callable[[T], object]
) -> tuple[list[T], list[T]]:
    """Split so that no group has items on both sides: whole groups, drawn in a seeded order,
    go to eval until it holds about ``fraction`` of the items (at least one group, never all).
    A group that would overshoot more than leaving it is left to train; when every group is that
    large, the smallest is held out alone."""
    groups: dict[object, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[group(item)].append(index)
    names = sorted(groups, key=str)
    if len(names) < 2:
        return list(items), []
    random.Random(seed).shuffle(names)
    target = fraction * len(items)
    held: set[int] = set()
    for name in names[:-1]:  # the last group always trains
        if len(held) + len(groups[name]) / 2 > target:
            continue  # taking this group would overshoot more than leaving it
        held.update(groups[name])
        if len(held) >= target:
            break
    if not held:
        held.update(groups[min(names, key=lambda name: len(groups[name]))])
    train = [item for i, item in enumerate(items) if i not in held]
    evaluation = [item for i, item in enumerate(items) if i in held]
    return train, evaluation


def time_split(items: Sequence[T], fraction: float, time: Callable[[T], object]) -> tuple[list[T], list[T]]:
    """Train on the older rows and evaluate on the newest ``fraction``: what a model meets after
    deployment in a domain that changes. Rows sharing the cut-off time stay together, on the side
    that keeps eval nearer ``fraction``; when that would still hold out more than twice as many
    rows, the newest ``fraction`` are taken exactly (ties in file order). When every row has the
    same time, none is held out (nothing older to train on)."""
    if len(items) < 2:
        return list(items), []
    order = sorted(range(len(items)), key=lambda i: time(items[i]))
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    cutoff = time(items[order[len(items) - n_eval]])
    held = {i for i in order if time(items[i]) >= cutoff}
    newer = {i for i in held if time(items[i]) > cutoff}
    if newer and abs(len(newer) - n_eval) < abs(len(held) - n_eval):
        held = newer
    if len(held) == len(items):  # every row has the same time: nothing older to train on
        return list(items), []
    if len(held) > 2 * n_eval:
        held = set(order[len(items) - n_eval:])
    train = [item for i, item in enumerate(items) if i not in held]
    evaluation = [item for i, item in enumerate(items) if i in held]
    return train, evaluation
