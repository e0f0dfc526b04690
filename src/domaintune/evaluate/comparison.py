"""Base vs tuned on the same rows: the metrics of each, their 95% intervals, whether the difference
is significant, and (classification) calibration and confusion. ``domaintune run`` and
``domaintune eval`` both score through here, so their numbers are computed the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from domaintune.evaluate import metrics as M
from domaintune.evaluate.calibration import confusion_matrix, expected_calibration_error, reliability_bins
from domaintune.evaluate.intervals import paired_intervals
from domaintune.evaluate.significance import mcnemar, paired_bootstrap_p


@dataclass
class Comparison:
    """Both models' metrics on the same rows; ``extra`` holds the metrics.json sections beyond them."""

    base: dict
    tuned: dict
    intervals: dict[str, dict[str, list[float]]]
    extra: dict = field(default_factory=dict)
    base_pred: list[str] = field(default_factory=list)  # classification: predicted labels, row by row
    tuned_pred: list[str] = field(default_factory=list)


def compare_classification(truth: list[str], labels: list[str], base_proba: np.ndarray,
                           tuned_proba: np.ndarray) -> Comparison:
    """Accuracy, macro-F1 and ECE of both models from their class probabilities (columns in the
    order of ``labels``), with intervals, McNemar's test, reliability bins and confusion matrices."""
    base_pred = [labels[i] for i in base_proba.argmax(1)]
    tuned_pred = [labels[i] for i in tuned_proba.argmax(1)]
    base = M.classification_metrics(truth, base_pred, labels)
    tuned = M.classification_metrics(truth, tuned_pred, labels)
    base_correct = [p == y for p, y in zip(base_pred, truth)]
    tuned_correct = [p == y for p, y in zip(tuned_pred, truth)]
    calibration = {}
    for name, proba, correct, scores in (("base", base_proba, base_correct, base),
                                         ("tuned", tuned_proba, tuned_correct, tuned)):
        scores["ece"] = expected_calibration_error(proba.max(1), correct)
        calibration[name] = reliability_bins(proba.max(1), correct)
    extra = {"significance": {"accuracy": mcnemar(base_correct, tuned_correct)},
             "calibration": calibration,
             "confusion": {"labels": labels, "tuned": confusion_matrix(truth, tuned_pred, labels),
                           "base": confusion_matrix(truth, base_pred, labels)}}
    return Comparison(base, tuned, {"accuracy": paired_intervals(base_correct, tuned_correct)}, extra,
                      base_pred, tuned_pred)


def compare_generation(base_scores: dict[str, list[float]], tuned_scores: dict[str, list[float]]) -> Comparison:
    """Intervals and significance from per-row scores (``{"exact_match": [...], "rouge_l": [...]}``;
    empty for pretraining, which has perplexity only). ``base``/``tuned`` are left to the caller,
    who also knows the perplexity."""
    intervals = {name: paired_intervals(base_scores[name], tuned_scores[name]) for name in base_scores}
    extra = {}
    if base_scores:
        extra["significance"] = {
            "exact_match": mcnemar(np.array(base_scores["exact_match"]) > 0, np.array(tuned_scores["exact_match"]) > 0),
            "rouge_l": {"p_value": paired_bootstrap_p(base_scores["rouge_l"], tuned_scores["rouge_l"]),
                        "method": "paired bootstrap"},
        }
    return Comparison({}, {}, intervals, extra)
