"""Tests for domaintune.data.split.holdout_split: seeded, stratified, lossless."""

from __future__ import annotations

from collections import Counter

import pytest

from domaintune.data.examples import TextExample
from domaintune.data.split import holdout_split


def labelled(counts: dict[str, int]) -> list[tuple[int, str]]:
    """Items (id, label), labels interleaved so groups are not contiguous."""
    items = []
    remaining = dict(counts)
    next_id = 0
    while any(remaining.values()):
        for label in counts:
            if remaining[label]:
                items.append((next_id, label))
                next_id += 1
                remaining[label] -= 1
    return items


def by_label(item):
    return item[1]


def assert_partition(items, train, evaluation):
    assert sorted(train + evaluation) == sorted(items)
    assert len(train) + len(evaluation) == len(items)
    assert not set(train) & set(evaluation)


def test_deterministic_for_a_seed():
    items = labelled({"a": 30, "b": 20, "c": 10})
    first = holdout_split(items, 0.2, seed=42, key=by_label)
    second = holdout_split(items, 0.2, seed=42, key=by_label)
    assert first == second


def test_different_seed_gives_different_split():
    items = labelled({"a": 30, "b": 20, "c": 10})
    _, eval_a = holdout_split(items, 0.2, seed=1, key=by_label)
    _, eval_b = holdout_split(items, 0.2, seed=2, key=by_label)
    assert set(eval_a) != set(eval_b)
    # ...but the same sizes per label, since only the choice changes
    assert Counter(map(by_label, eval_a)) == Counter(map(by_label, eval_b))


def test_input_is_not_mutated():
    items = labelled({"a": 10, "b": 10})
    copy = list(items)
    holdout_split(items, 0.3, seed=0, key=by_label)
    assert items == copy


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5])
def test_stratified_each_label_share_close_to_fraction(fraction):
    counts = {"a": 100, "b": 40, "c": 20, "d": 10}
    items = labelled(counts)
    train, evaluation = holdout_split(items, fraction, seed=7, key=by_label)
    assert_partition(items, train, evaluation)
    held = Counter(map(by_label, evaluation))
    for label, n in counts.items():
        expected = min(n - 1, max(1, round(n * fraction)))
        assert held[label] == expected, label
        assert abs(held[label] / n - fraction) <= max(1 / n, 0.05) + 1e-9
    assert abs(len(evaluation) / len(items) - fraction) < 0.05


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.9, 0.99])
def test_every_label_with_two_items_in_both_sides(seed, fraction):
    counts = {"two": 2, "three": 3, "five": 5, "many": 50}
    items = labelled(counts)
    train, evaluation = holdout_split(items, fraction, seed=seed, key=by_label)
    assert_partition(items, train, evaluation)
    train_labels = Counter(map(by_label, train))
    eval_labels = Counter(map(by_label, evaluation))
    for label in counts:
        assert train_labels[label] >= 1, label
        assert eval_labels[label] >= 1, label


def test_singleton_label_stays_in_train():
    items = labelled({"a": 10, "b": 10, "rare": 1})
    for seed in range(10):
        train, evaluation = holdout_split(items, 0.5, seed=seed, key=by_label)
        assert ("rare" in map(by_label, train))
        assert "rare" not in map(by_label, evaluation)
        assert set(map(by_label, evaluation)) <= set(map(by_label, train))


def test_no_item_lost_or_duplicated_and_order_kept():
    items = labelled({"x": 17, "y": 9, "z": 4, "w": 1})
    train, evaluation = holdout_split(items, 0.3, seed=123, key=by_label)
    assert_partition(items, train, evaluation)
    # both sides keep the input order
    position = {item: i for i, item in enumerate(items)}
    assert [position[t] for t in train] == sorted(position[t] for t in train)
    assert [position[e] for e in evaluation] == sorted(position[e] for e in evaluation)


def test_equal_items_are_split_by_position_not_value():
    items = ["same"] * 10
    train, evaluation = holdout_split(items, 0.3, seed=0)
    assert len(train) == 7 and len(evaluation) == 3
    assert train + evaluation == items


def test_works_without_key():
    items = list(range(50))
    train, evaluation = holdout_split(items, 0.2, seed=3)
    assert_partition(items, train, evaluation)
    assert len(evaluation) == 10
    assert len(train) == 40
    assert holdout_split(items, 0.2, seed=3) == (train, evaluation)
    assert holdout_split(items, 0.2, seed=4)[1] != evaluation


def test_without_key_tiny_inputs():
    assert holdout_split([], 0.2, seed=0) == ([], [])
    assert holdout_split(["only"], 0.2, seed=0) == (["only"], [])
    train, evaluation = holdout_split(["a", "b"], 0.9, seed=0)
    assert len(train) == 1 and len(evaluation) == 1
    assert sorted(train + evaluation) == ["a", "b"]


def test_with_text_examples_by_label():
    examples = [TextExample(text=f"t{i}", label=("pos" if i % 3 else "neg"), where=f"f.csv:{i + 2}")
                for i in range(30)]
    train, evaluation = holdout_split(examples, 0.2, seed=42, key=lambda e: e.label)
    assert sorted(e.where for e in train + evaluation) == sorted(e.where for e in examples)
    assert Counter(e.label for e in evaluation) == {"pos": 4, "neg": 2}


def test_mixed_type_keys_do_not_crash():
    items = [(i, 1 if i % 2 else "1") for i in range(8)] + [(100, None), (101, None)]
    train, evaluation = holdout_split(items, 0.25, seed=0, key=by_label)
    assert_partition(items, train, evaluation)
    assert holdout_split(items, 0.25, seed=0, key=by_label) == (train, evaluation)
