"""Task metrics, computed the same way for the base and the tuned model."""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-label precision/recall/F1/support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    present = [label for label in labels if label in set(y_true) | set(y_pred)]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=present, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)),
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(present, precision, recall, f1, support)
        },
    }


def normalize_answer(text: str) -> str:
    """Lower case, Unicode NFKC, no punctuation or articles, single spaces (SQuAD-style)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> list[float]:
    return [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def generation_metrics(predictions: list[str], references: list[str], perplexity: float) -> tuple[dict, dict]:
    """The metrics, and the per-row scores they average (for intervals and the report)."""
    per_row = {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references)}
    metrics = {name: float(np.mean(scores)) for name, scores in per_row.items()}
    return {**metrics, "perplexity": float(perplexity)}, per_row


HEADLINE = {
    "classification": ["accuracy", "macro_f1"],
    "sft": ["exact_match", "rouge_l", "perplexity"],
    "pretrain": ["perplexity"],
}
LOWER_IS_BETTER = {"perplexity"}


def headline(task: str, base: dict, tuned: dict) -> list[tuple[str, float, float]]:
    """(metric, base, tuned) for the metrics a task is judged by."""
    return [(k, float(base[k]), float(tuned[k])) for k in HEADLINE[task]]
