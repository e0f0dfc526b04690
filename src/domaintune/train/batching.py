"""Batches of similar-length rows, so that padding costs little."""

from __future__ import annotations

import random

import torch


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, pool: int = 50) -> list[list[int]]:
    """Shuffled batches of row indices of similar length.

    Rows are shuffled, cut into pools of ``pool`` batches, sorted by length inside each pool, and
    the batches shuffled again: the order stays random from epoch to epoch (``seed`` differs)
    while each batch pads to nearly its own length.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start:start + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_right(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)
