"""Hold out evaluation rows when a recipe has no eval file: seeded, stratified by label."""

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
