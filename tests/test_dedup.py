"""Tests for domaintune.data.dedup: exact and near duplicates, within train and eval-to-train leaks."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from domaintune.data.dedup import (
    NearDuplicateIndex,
    deduplicate,
    exact_key,
    normalize_for_hash,
)

TICKET = (
    "My order arrived yesterday but the blue ceramic mug inside was cracked along the handle, "
    "so I would like a replacement sent to the same address as before please."
)
ONE_WORD_CHANGED = TICKET.replace("yesterday", "today")
TWO_WORDS_CHANGED = TICKET.replace("blue", "green").replace("handle", "rim")
SAME_TOPIC = [
    "My order arrived today and the glass vase inside was broken into pieces, can you send me a "
    "refund instead of a replacement?",
    "The mug I ordered last week has not arrived yet and the tracking page has not changed for "
    "five days, where is my order?",
    "I would like to change the delivery address for my order of two ceramic mugs before it "
    "ships, the new address is below.",
    "My order arrived yesterday but the ceramic mug was the wrong colour, I ordered blue and got "
    "green, please exchange it.",
]


def grams(text: str) -> set[str]:
    """Character 5-grams of the normalized text, computed independently of the module."""
    text = normalize_for_hash(text)
    return {text[i : i + 5] for i in range(max(1, len(text) - 4))}


def jaccard(a: str | set[str], b: str | set[str]) -> float:
    x = grams(a) if isinstance(a, str) else a
    y = grams(b) if isinstance(b, str) else b
    return len(x & y) / len(x | y)


def assert_counts_add_up(result, n_train: int, n_eval: int) -> None:
    assert len(result.train_keep) == n_train
    assert sum(result.train_keep) + len(result.train_duplicate_of) == n_train
    assert not any(result.train_keep[row] for row in result.train_duplicate_of)
    assert len(result.eval_keep) == n_eval
    dropped = len(result.eval_leaks) + len(result.eval_duplicate_of)
    assert sum(result.eval_keep) + dropped == n_eval
    assert not set(result.eval_leaks) & set(result.eval_duplicate_of)


def test_test_pairs_sit_clearly_either_side_of_the_threshold():
    # The tests below rely on these similarities; a change of shingling shows up here first.
    assert jaccard(TICKET, ONE_WORD_CHANGED) > 0.88
    assert 0.75 < jaccard(TICKET, TWO_WORDS_CHANGED) < 0.82
    assert all(jaccard(TICKET, other) < 0.3 for other in SAME_TOPIC)


def test_normalize_for_hash_folds_case_punctuation_whitespace_and_compatibility_forms():
    assert normalize_for_hash("  Hello,\tWORLD!!  \n How's it — going? ") == "hello world how s it going"
    assert normalize_for_hash("ﬁle Ｎｏ．４２") == "file no 42"  # ligature, full-width forms
    assert normalize_for_hash("STRASSE") == normalize_for_hash("straße")
    assert normalize_for_hash("?!...") == ""


def test_exact_key_equal_for_variants_and_different_for_different_words():
    variants = ["Reset my password, please.", "reset my password please", "RESET  my\npassword -- please!"]
    assert len({exact_key(text) for text in variants}) == 1
    assert exact_key("Reset my password please") != exact_key("Reset my username please")
    assert exact_key("ab c") != exact_key("a bc")


def test_exact_duplicates_differing_in_case_punctuation_and_whitespace_are_dropped():
    train = ["Where is my refund?", "The app crashes on login.", "where is my REFUND", "  Where is my refund!!! "]
    result = deduplicate(train)
    assert result.train_keep == [True, True, False, False]
    assert result.train_duplicate_of == {2: (0, "exact"), 3: (0, "exact")}


def test_first_occurrence_is_kept():
    train = ["The app crashes on login.", TICKET.upper(), TICKET, ONE_WORD_CHANGED]
    result = deduplicate(train)
    assert result.train_keep == [True, True, False, False]
    assert result.train_duplicate_of == {2: (1, "exact"), 3: (1, "near")}


def test_one_word_changed_is_a_near_duplicate_two_words_only_at_a_lower_threshold():
    assert deduplicate([TICKET, ONE_WORD_CHANGED]).train_duplicate_of == {1: (0, "near")}
    assert deduplicate([TICKET, TWO_WORDS_CHANGED]).train_keep == [True, True]
    lower = deduplicate([TICKET, TWO_WORDS_CHANGED], threshold=0.75)
    assert lower.train_duplicate_of == {1: (0, "near")}


def test_different_texts_on_the_same_topic_are_kept():
    result = deduplicate([TICKET, *SAME_TOPIC])
    assert all(result.train_keep)
    assert result.train_duplicate_of == {}


def test_eval_rows_leaked_from_train_are_dropped_from_eval_not_train():
    train = ["The app crashes on login.", TICKET, "How do I export my invoices?"]
    evaluation = ["how do I export my invoices", "Can I pay by bank transfer?", ONE_WORD_CHANGED]
    result = deduplicate(train, evaluation)
    assert result.train_keep == [True, True, True]
    assert result.eval_keep == [False, True, False]
    assert result.eval_leaks == {0: (2, "exact"), 2: (1, "near")}
    assert result.eval_duplicate_of == {}


def test_a_leak_names_the_kept_training_row_even_when_it_matches_a_dropped_one():
    result = deduplicate([TICKET, TICKET.lower()], [TICKET + "!"])
    assert result.train_duplicate_of == {1: (0, "exact")}
    assert result.eval_leaks == {0: (0, "exact")}


def test_duplicates_within_eval_are_dropped_and_reported_apart_from_leaks():
    evaluation = [TICKET, "Can I pay by bank transfer?", "can i pay by bank transfer", ONE_WORD_CHANGED]
    result = deduplicate(["The app crashes on login."], evaluation)
    assert result.eval_keep == [True, True, False, False]
    assert result.eval_duplicate_of == {2: (1, "exact"), 3: (0, "near")}
    assert result.eval_leaks == {}


def test_exact_and_near_can_be_switched_off():
    train = [TICKET, TICKET.lower(), ONE_WORD_CHANGED]
    assert deduplicate(train, exact=False).train_duplicate_of == {1: (0, "near"), 2: (0, "near")}
    assert deduplicate(train, near=False).train_duplicate_of == {1: (0, "exact")}
    nothing = deduplicate(train, [TICKET], exact=False, near=False)
    assert nothing.train_keep == [True, True, True]
    assert nothing.eval_keep == [True]


def test_texts_empty_after_normalization_are_only_exact_duplicates():
    result = deduplicate(["???", "!!!", "ok", "OK."])
    assert result.train_duplicate_of == {1: (0, "exact"), 3: (2, "exact")}
    assert deduplicate(["???", "!!!"], exact=False).train_keep == [True, True]


def random_corpus(seed: int, size: int) -> list[str]:
    """Tickets from a small vocabulary with exact and one-word-changed copies mixed in."""
    rng = random.Random(seed)
    words = [f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{rng.choice('nrstlk')}{i}" for i in range(300)]
    texts: list[str] = []
    for _ in range(size):
        roll = rng.random()
        if texts and roll < 0.15:
            texts.append(rng.choice(texts).title())
        elif texts and roll < 0.3:
            tokens = rng.choice(texts).split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            texts.append(" ".join(tokens))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))))
    return texts


def test_counts_add_up_and_every_near_pair_is_really_above_the_threshold():
    texts = random_corpus(seed=3, size=600)
    result = deduplicate(texts[:500], texts[450:])
    assert_counts_add_up(result, 500, 150)
    assert result.eval_leaks  # the overlap 450..500 leaks at least
    pairs = [(texts[row], texts[kept]) for row, (kept, kind) in result.train_duplicate_of.items() if kind == "near"]
    pairs += [(texts[450 + row], texts[kept]) for row, (kept, kind) in result.eval_leaks.items() if kind == "near"]
    assert pairs
    assert all(jaccard(a, b) >= 0.85 for a, b in pairs)
    assert all(result.train_keep[kept] for kept, _ in result.train_duplicate_of.values())


def test_pairs_clearly_above_the_threshold_are_all_found():
    texts = random_corpus(seed=5, size=400)
    result = deduplicate(texts)
    kept = [grams(text) for text, keep in zip(texts, result.train_keep) if keep]
    assert not any(jaccard(a, b) >= 0.9 for i, a in enumerate(kept) for b in kept[:i])


def test_deterministic_across_processes_with_different_hash_seeds():
    script = (
        "import json; from test_dedup import random_corpus; from domaintune.data.dedup import deduplicate;"
        "texts = random_corpus(seed=7, size=300); r = deduplicate(texts[:250], texts[200:]);"
        "print(json.dumps([r.train_keep, sorted(r.train_duplicate_of.items()), r.eval_keep,"
        " sorted(r.eval_leaks.items()), sorted(r.eval_duplicate_of.items())]))"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": tests_dir},
            capture_output=True, text=True, check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_index_returns_most_similar_first_and_string_keys_work():
    index = NearDuplicateIndex(threshold=0.75)
    index.add("two-changed", TWO_WORDS_CHANGED)
    index.add("one-changed", ONE_WORD_CHANGED)
    index.add("other", SAME_TOPIC[0])
    assert index.query(TICKET) == ["one-changed", "two-changed"]
    assert index.query(SAME_TOPIC[1]) == []
    assert len(index) == 3


def test_index_rejects_a_key_twice_and_a_bad_threshold():
    index = NearDuplicateIndex()
    index.add(1, TICKET)
    with pytest.raises(ValueError, match="already"):
        index.add(1, ONE_WORD_CHANGED)
    for threshold in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            NearDuplicateIndex(threshold=threshold)


@pytest.mark.parametrize("threshold", [0.99, 1.0])
def test_highest_thresholds_find_only_texts_with_the_same_shingles(threshold: float):
    result = deduplicate([TICKET, TICKET.upper(), ONE_WORD_CHANGED], exact=False, threshold=threshold)
    assert result.train_duplicate_of == {1: (0, "near")}
