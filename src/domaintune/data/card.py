"""The data card: where the data came from (with hashes), what each step did to it, and what is
left: counts that add up, label and length distributions, PII found, duplicates and leakage.
Written as ``data_card.json`` (for machines) and ``data_card.md`` (for people)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from domaintune.catalog import sha256_file
from domaintune.data.dedup import MIN_CONTAINED_SHINGLES
from domaintune.recipe import Recipe

STEP_TITLES = {
    "validate": "invalid rows",
    "clean": "empty after cleaning",
    "dedup": "duplicates",
    "leakage": "eval rows duplicating or overlapping training rows (leakage)",
    "labels": "eval labels never seen in training",
}
MAX_LEAKS_LISTED = 20
MAX_CONFLICTS_LISTED = 20


@dataclass
class SideSummary:
    """What the card says of the kept rows of one side: how many, their labels and lengths."""

    rows: int
    labels: dict[str, int]
    chars: np.ndarray  # per row: characters in all its texts
    words: np.ndarray

    @classmethod
    def of(cls, examples: list) -> SideSummary:
        labels = Counter(getattr(e, "label", None) for e in examples)
        return cls(len(examples), {k: v for k, v in labels.items() if k is not None},
                   np.array([sum(len(t) for t in _texts(e)) for e in examples], dtype=np.int64),
                   np.array([sum(len(t.split()) for t in _texts(e)) for e in examples], dtype=np.int64))


class DroppedTally:
    """Counts of dropped rows by step, source and reason, kept as rows are dropped: the card
    needs no list of them."""

    def __init__(self) -> None:
        self.total = 0
        self.steps: dict[str, dict[str, int]] = {step: {"train": 0, "eval": 0} for step in STEP_TITLES}
        self.reasons: dict[str, Counter] = {step: Counter() for step in STEP_TITLES}
        self.leaks: list[dict[str, str]] = []  # the first MAX_LEAKS_LISTED
        self.conflicts = 0  # duplicates dropped whose kept row has another label
        self.conflicts_listed: list[dict[str, str]] = []  # the first MAX_CONFLICTS_LISTED

    def add(self, dropped) -> None:
        """Count one ``Dropped``."""
        self.total += 1
        self.steps[dropped.step][dropped.source] += 1
        self.reasons[dropped.step][_reason_kind(dropped.step, dropped.reason)] += 1
        if dropped.step == "leakage" and len(self.leaks) < MAX_LEAKS_LISTED:
            self.leaks.append({"where": dropped.where, "reason": dropped.reason})
        if dropped.conflict is not None:
            self.conflicts += 1
            if len(self.conflicts_listed) < MAX_CONFLICTS_LISTED:
                self.conflicts_listed.append(dict(dropped.conflict))

    @classmethod
    def of(cls, dropped: list) -> DroppedTally:
        tally = cls()
        for d in dropped:
            tally.add(d)
        return tally


def build_card(*, spec: Recipe, sources: dict[str, tuple[Path, int]], train: list, evaluation: list, dropped: list,
               pii_counts: dict[str, int], rows_with_pii: int, cleaned_rows: int, split: str,
               cutoff: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect the card as plain data from the kept examples and the dropped rows. Raises if the
    counts do not add up (a bug, not a user error)."""
    return card_from_tallies(spec=spec, sources=sources, train=SideSummary.of(train),
                             evaluation=SideSummary.of(evaluation), dropped=DroppedTally.of(dropped),
                             pii_counts=pii_counts, rows_with_pii=rows_with_pii, cleaned_rows=cleaned_rows,
                             split=split, cutoff=cutoff)


def card_from_tallies(*, spec: Recipe, sources: dict[str, tuple[Path, int]], train: SideSummary,
                      evaluation: SideSummary, dropped: DroppedTally, pii_counts: dict[str, int], rows_with_pii: int,
                      cleaned_rows: int, split: str, cutoff: dict[str, Any] | None = None) -> dict[str, Any]:
    """``build_card`` from summaries, for data too large to hold as examples. ``cutoff``: for a
    time split, the latest training time and the earliest eval time as written in the data."""
    rows_in = sum(n for _, n in sources.values())
    if rows_in != dropped.total + train.rows + evaluation.rows:
        raise AssertionError(f"data accounting broken: {rows_in} rows in, {dropped.total} dropped, "
                             f"{train.rows} + {evaluation.rows} kept")
    d = spec.data
    card: dict[str, Any] = {
        "task": spec.task,
        "sources": [{"role": role, "file": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size,
                     "rows_in": n} for role, (path, n) in sources.items()],
        "rows_in": rows_in,
        "dropped": {step: dict(counts) for step, counts in dropped.steps.items()},
        "dropped_total": dropped.total,
        "reasons": {step: dict(counter.most_common(10)) for step, counter in dropped.reasons.items() if counter},
        "kept": {"train": train.rows, "eval": evaluation.rows},
        "on_bad_rows": d.on_bad_rows,
        "cleaning": {**d.clean.model_dump(), "rows_changed": cleaned_rows},
        "pii": {"redact": d.pii.redact, "mode": d.pii.mode if d.pii.redact else None,
                "types": d.pii.types or "all", "found": dict(sorted(pii_counts.items())), "rows_with_pii": rows_with_pii},
        "dedup": {**d.dedup.model_dump(), "label_conflicts": dropped.conflicts,
                  "label_conflicts_listed": list(dropped.conflicts_listed), "leaks": list(dropped.leaks)},
        "split": {"by": split, **({"eval_fraction": d.split.eval_fraction} if split != "eval file" else {}),
                  **(cutoff or {})},
        "lengths": {"train": _lengths(train), "eval": _lengths(evaluation)},
    }
    if spec.task == "classification":
        card["labels"] = {"train": dict(sorted(train.labels.items())), "eval": dict(sorted(evaluation.labels.items()))}
        card["label_variants"] = label_variants(Counter(train.labels) + Counter(evaluation.labels))
    return card


def label_variants(counts: dict[str, int]) -> list[dict[str, int]]:
    """Groups of labels that differ only in case or spacing, each label with its rows (train and
    eval). They are separate classes, as written: case may mean something, so they are not merged,
    but more often one class was written two ways, which splits its rows and costs accuracy."""
    groups: dict[str, dict[str, int]] = {}
    for label, n in sorted(counts.items()):
        groups.setdefault(" ".join(label.split()).casefold(), {})[label] = n
    return [group for _, group in sorted(groups.items()) if len(group) > 1]


def label_variants_warning(card: dict[str, Any]) -> str | None:
    """What to tell the user of ``card``'s labels that differ only in case or spacing (None: none)."""
    variants = card.get("label_variants")
    if not variants:
        return None
    groups = "; ".join(", ".join(f"{label!r} ({n} row{'s' * (n != 1)})" for label, n in group.items())
                       for group in variants)
    return (f"labels that differ only in case or spacing are trained as separate classes: {groups}. "
            "If each group is one class, normalise the label column (write each label one way, e.g. lower case) "
            "and run again")


def _reason_kind(step: str, reason: str) -> str:
    """Reasons without the row they point at, so that they can be counted."""
    if step == "leakage" and reason.startswith("contain"):  # "contained in training row x (containment 0.93)"
        return reason.split(" training row")[0] + " a training row"
    if step in ("dedup", "leakage"):
        return reason.split(" duplicate")[0] + " duplicate"
    if step == "labels":
        return "label never occurs in training"
    return reason


def _overlap_note(containment: float | None) -> str:
    if containment is None:
        return "Eval rows overlapping training rows: not looked for (`containment: null`)."
    return (f"Eval rows overlapping training rows (containment ≥ {containment}: that share of the shorter row's "
            f"character 5-grams is in the other, the shorter having {MIN_CONTAINED_SHINGLES} or more) are leakage too.")


def _cutoff_note(split: dict[str, Any]) -> str:
    if "train_until" not in split:
        return ""
    return (f" Training rows have `{split['time_field']}` up to {split['train_until']}; eval rows from "
            f"{split['eval_from']}.")


def _texts(example) -> list[str]:
    if hasattr(example, "messages"):
        return [m["content"] for m in example.messages]
    return [example.text]


def _lengths(side: SideSummary) -> dict[str, dict[str, float]]:
    if not side.rows:
        return {}
    return {name: {"min": int(v.min()), "mean": round(float(v.mean()), 1), "median": float(np.median(v)),
                   "p95": float(np.percentile(v, 95)), "max": int(v.max())}
            for name, v in (("chars", side.chars), ("words", side.words))}


def _bars(counts: dict[str, int], width: int = 30) -> list[str]:
    top = max(counts.values(), default=0) or 1
    return [f"| `{k}` | {v} | `{'█' * max(1, round(width * v / top))}` |" for k, v in counts.items()]


def render_card(card: dict[str, Any]) -> str:
    """The card as markdown."""
    lines = ["# Data card", "", f"Task: {card['task']}. Rows in: {card['rows_in']}; kept for training "
             f"{card['kept']['train']}, for evaluation {card['kept']['eval']}; dropped {card['dropped_total']}.", "",
             "## Sources", "", "| role | file | rows | sha256 |", "|---|---|---|---|"]
    lines += [f"| {s['role']} | `{Path(s['file']).name}` | {s['rows_in']} | `{s['sha256'][:16]}…` |" for s in card["sources"]]
    lines += ["", "## What each step dropped", "", f"Bad rows: `on_bad_rows: {card['on_bad_rows']}`.", "",
              "| step | from train file | from eval file |", "|---|---|---|"]
    lines += [f"| {STEP_TITLES[step]} | {c['train']} | {c['eval']} |" for step, c in card["dropped"].items()]
    lines += [f"| **kept** | {card['kept']['train']} (train) | {card['kept']['eval']} (eval) |", ""]
    for step, reasons in card["reasons"].items():
        lines += [f"{STEP_TITLES[step]}:"] + [f"- {reason}: {n}" for reason, n in reasons.items()] + [""]
    pii = card["pii"]
    lines += ["## Personal data", ""]
    if pii["redact"]:
        lines += [f"Redacted ({pii['mode']}) in {pii['rows_with_pii']} rows before training and evaluation; "
                  f"types: {pii['types'] if isinstance(pii['types'], str) else ', '.join(pii['types'])}.", ""]
        lines += (["| type | found |", "|---|---|"] + [f"| {t} | {n} |" for t, n in pii["found"].items()]
                  if pii["found"] else ["None found."])
    else:
        lines += ["Not redacted (`data.pii.redact: false`)."]
    dd = card["dedup"]
    lines += ["", "## Duplicates and leakage", "",
              f"Exact: {dd['exact']}, near-duplicates: {dd['near']} (Jaccard ≥ {dd['threshold']}). "
              f"Duplicates with different labels: {dd['label_conflicts']}. " + _overlap_note(dd.get("containment"))]
    if dd.get("label_conflicts_listed"):
        lines += ["", "Duplicates dropped whose kept row has another label (fix the label of one of them):"]
        lines += [f"- {x['where']} ({x['label']!r}) duplicates {x['kept_where']} ({x['kept_label']!r}), which was kept"
                  for x in dd["label_conflicts_listed"]]
    if dd["leaks"]:
        lines += ["", "Eval rows removed as leaked from training:"] + [f"- {x['where']}: {x['reason']}" for x in dd["leaks"]]
    c = card["cleaning"]
    lines += ["", "## Cleaning", "", f"{c['rows_changed']} rows changed: " + ", ".join(
        k for k in ("unicode_nfc", "strip_control", "normalize_whitespace", "strip_html") if c[k]) + ".", "",
        "## Split", "", f"By: {card['split']['by']}" + (f", eval fraction {card['split']['eval_fraction']}"
                                                        if "eval_fraction" in card["split"] else "") + "."
        + _cutoff_note(card["split"]), ""]
    if warning := label_variants_warning(card):
        lines += ["## Labels differing only in case or spacing", "", f"Warning: {warning}.", ""]
    if "labels" in card:
        for side in ("train", "eval"):
            lines += [f"## Labels ({side})", "", "| label | rows | |", "|---|---|---|", *_bars(card["labels"][side]), ""]
    lines += ["## Lengths", "", "| side | unit | min | median | mean | p95 | max |", "|---|---|---|---|---|---|---|"]
    for side, units in card["lengths"].items():
        for unit, s in units.items():
            lines.append(f"| {side} | {unit} | {s['min']} | {s['median']} | {s['mean']} | {s['p95']} | {s['max']} |")
    if card.get("processed"):
        lines += ["", "## Processed data", ""] + [f"- `{p['file']}` (sha256 `{p['sha256'][:16]}…`)" for p in card["processed"]]
    return "\n".join(lines) + "\n"


def write_card(card: dict[str, Any], directory: Path) -> None:
    (directory / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
    (directory / "data_card.md").write_text(render_card(card), encoding="utf-8")
