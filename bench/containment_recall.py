"""Recall of the leakage-by-containment search against the length ratio of the two rows.

Builds pairs from the real-like texts of the repository (the support tickets and clinical notes
of recipes/*/data, the texts of tests/data/pii_eval.jsonl): a passage of about 40 words, and a
longer row that holds it among other texts so that it has ρ times the passage's shingles. At
containment 1.0 the passage is copied as it is; at about 0.92 a word or two of it are changed. Each
case runs ``dedup.contained_leaks`` once, the pairs' rows mixed with unrelated rows, both ways
round: the eval row is the passage (``contained in``) or the longer row (``contains``). Prints the
share of the pairs found, and the seconds each case took.

    PYTHONPATH=src .venv/bin/python bench/containment_recall.py [--pairs 300]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

from domaintune.data.dedup import CONTAINMENT, containment, contained_leaks, shingles

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (1, 1.5, 2, 3, 5, 10)


def corpus() -> list[str]:
    """Every text of the example data, distinct, in a fixed order."""
    texts = []
    with open(ROOT / "recipes" / "support-intents" / "data" / "tickets.csv", encoding="utf-8") as fh:
        texts += [row["text"] for row in csv.DictReader(fh)]
    notes = ROOT / "recipes" / "clinical-triage" / "data" / "notes.jsonl"
    for line in notes.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(f"{row['input']} {row['output']}")
    texts += [json.loads(line)["text"] for line in (ROOT / "tests" / "data" / "pii_eval.jsonl").read_text(
        encoding="utf-8").splitlines()]
    return sorted(set(texts))


def passage(rng: random.Random, texts: list[str], words: int = 40) -> str:
    """About ``words`` words of texts taken one after the other (as a paragraph cut from a document)."""
    taken: list[str] = []
    while len(taken) < words:
        taken += rng.choice(texts).split()
    start = rng.randrange(0, max(1, len(taken) - words))
    return " ".join(taken[start : start + words])


def edited(rng: random.Random, text: str, low: float, high: float) -> str | None:
    """``text`` with words replaced until the containment of the result in ``text`` is within [low, high]."""
    words = text.split()
    original = shingles(text)
    for _ in range(6):
        words[rng.randrange(len(words))] = rng.choice(["today", "again", "really", "maybe", "twice", "urgently"])
        changed = " ".join(words)
        value = containment(shingles(changed), original)
        if low <= value <= high:
            return changed
        if value < low:
            return None
    return None


def longer(rng: random.Random, texts: list[str], inner: str, ratio: float) -> str:
    """A row holding ``inner`` among other texts, with about ``ratio`` times its shingles."""
    target = ratio * shingles(inner).size
    before, after = [], []
    while shingles(" ".join([*before, inner, *after])).size < target:
        (before if rng.random() < 0.5 else after).append(rng.choice(texts))
    text = " ".join([*before, inner, *after])
    # Trim words from the far end while still long enough: ratios close to the one asked for.
    words = text.split()
    while len(words) > len(inner.split()) and shingles(" ".join(words[:-1])).size >= target \
            and inner in " ".join(words[:-1]):
        words.pop()
    return " ".join(words)


def pairs(seed: int, count: int, ratio: float, value: float, texts: list[str]) -> list[tuple[str, str]]:
    """``count`` (short row, long row) pairs at about ``ratio`` and containment ``value``."""
    rng = random.Random(seed)
    found = []
    while len(found) < count:
        inner = passage(rng, texts)
        outer = inner if ratio == 1 else longer(rng, texts, inner, ratio)
        short = inner if value == 1.0 else edited(rng, inner, value - 0.015, value + 0.015)
        if short is not None and containment(shingles(short), shingles(outer)) >= CONTAINMENT:
            found.append((short, outer))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs per case (default 300)")
    parser.add_argument("--others", type=int, default=2000, help="unrelated rows mixed in (default 2000)")
    args = parser.parse_args()
    texts = corpus()
    print(f"{len(texts)} texts; {args.pairs} pairs a case, {args.others} unrelated rows of up to 10 texts each")
    rng = random.Random(0)
    others = [" ".join(rng.choice(texts) for _ in range(rng.randint(1, 10))) for _ in range(args.others)]
    print(f"{'ratio':>6} {'containment':>11} {'contained in':>13} {'contains':>9} {'seconds':>8}")
    for value in (1.0, 0.92):
        for ratio in RATIOS:
            made = pairs(int(ratio * 100 + value * 10), args.pairs, ratio, value, texts)
            shares, seconds = [], 0.0
            for eval_is_short in (True, False):
                train = [outer if eval_is_short else short for short, outer in made] + others
                evaluation = [short if eval_is_short else outer for short, outer in made]
                start = time.perf_counter()
                leaks = contained_leaks(train, evaluation)
                seconds += time.perf_counter() - start
                shares.append(len(leaks) / len(made))
            print(f"{ratio:>6g} {value:>11.2f} {shares[0]:>13.1%} {shares[1]:>9.1%} {seconds:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
