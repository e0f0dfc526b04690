"""Per-type precision and recall of the PII detector on a labelled JSONL set.

Each line is ``{"text": ..., "spans": [{"type", "start", "end"}, ...]}``. Scoring is span-level
and lenient about boundaries: a predicted span is correct when a gold span of the same type
overlaps it, and a gold span is found when a predicted span of the same type overlaps it.
Precision counts predictions, recall counts gold spans; a type never predicted has precision 1.

    python bench/pii_eval.py [tests/data/pii_eval.jsonl]    # prints a markdown table and rows/s
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from domaintune.data import pii
from domaintune.data.pii import PII_TYPES, PiiRedactor

DEFAULT_SET = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_eval.jsonl"


def load(path: str | Path) -> list[dict]:
    """The labelled rows of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def evaluate(path: str | Path, redactor: PiiRedactor | None = None) -> dict[str, dict[str, float]]:
    """``{type: {"precision", "recall", "support"}}`` for every type in ``PII_TYPES``."""
    redactor = redactor or PiiRedactor()
    counts = {t: {"pred": 0, "pred_ok": 0, "gold": 0, "gold_found": 0} for t in PII_TYPES}
    for row in load(path):
        gold = [(s["type"], (s["start"], s["end"])) for s in row["spans"]]
        pred = [(f.type, (f.start, f.end)) for f in redactor.find(row["text"])]
        for kind, span in pred:
            counts[kind]["pred"] += 1
            counts[kind]["pred_ok"] += any(k == kind and _overlaps(span, g) for k, g in gold)
        for kind, span in gold:
            counts[kind]["gold"] += 1
            counts[kind]["gold_found"] += any(k == kind and _overlaps(span, p) for k, p in pred)
    return {
        kind: {
            "precision": c["pred_ok"] / c["pred"] if c["pred"] else 1.0,
            "recall": c["gold_found"] / c["gold"] if c["gold"] else 1.0,
            "support": c["gold"],
        }
        for kind, c in counts.items()
    }


def rows_per_second(texts: list[str], repeat: int = 5) -> float:
    """Throughput of ``PiiRedactor().redact`` over ``texts``, best of ``repeat`` passes."""
    redactor = PiiRedactor()
    best = float("inf")
    for _ in range(repeat):
        pii._phones_in.cache_clear()  # every pass starts cold: it sees the same texts as the last
        start = time.perf_counter()
        for text in texts:
            redactor.redact(text)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def markdown_table(scores: dict[str, dict[str, float]]) -> str:
    """The scores as a markdown table, one row per type."""
    lines = ["| type | precision | recall | support |", "|---|---:|---:|---:|"]
    lines += [f"| {kind} | {s['precision']:.3f} | {s['recall']:.3f} | {s['support']} |" for kind, s in scores.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SET
    print(markdown_table(evaluate(path)))
    texts = [row["text"] for row in load(path)]
    # Training rows are often about twice as long as the labelled lines: time those too.
    pairs = [f"{a} {b}" for a, b in zip(texts[::2], texts[1::2])]
    print()
    for name, batch in (("labelled rows", texts), ("two rows joined", pairs)):
        mean = sum(map(len, batch)) / len(batch)
        speed = rows_per_second(batch)
        print(f"{name}: {len(batch)} texts, mean {mean:.0f} characters, {speed:,.0f} texts/s (one core)")
