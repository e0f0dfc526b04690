"""Metrics per slice of the evaluation rows (per region, channel, product, ...), to find where a
model is weak even when its average looks fine.

The pipeline passes its per-row results, one dict per evaluation row, with the slicing columns
under ``meta``::

    classification: {"label": "refund", "base": "billing", "tuned": "refund", "meta": {"region": "EU"}}
    generation:     {"base": {"exact_match": 0.0, "rouge_l": 0.4},
                     "tuned": {"exact_match": 1.0, "rouge_l": 1.0}, "meta": {"region": "EU"}}

with :func:`classification_score` or :func:`mean_scores` as the ``score``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

from domaintune.errors import RecipeError
from domaintune.evaluate.metrics import LOWER_IS_BETTER, classification_metrics

MISSING = "(missing)"
MIN_ROWS = 5  # below this a slice's metric is mostly noise: reported, never ranked


def slice_metrics(rows: list[dict], field: str, score: Callable[[list[dict]], dict],
                  metric: str | None = None) -> dict:
    """Score each value of ``field`` separately and find the weakest slice.

    ``field`` is read from ``row["meta"]``, or from the row itself when ``meta`` lacks it; rows
    without a value (absent, None, empty, NaN) form the slice ``"(missing)"``. ``score`` gets the
    rows of one slice and returns ``{"base": {metric: value}, "tuned": {metric: value}}``.
    ``metric`` ranks the slices (default: the first metric ``score`` returns); for perplexity and
    the like, lower ranks better.

    Returns ``{"field", "metric", "slices", "worst", "gap"}``: ``slices`` maps each value, largest
    first, to ``{"rows", "base", "tuned", "too_small"}``; ``worst`` and ``gap`` (best minus worst,
    as a positive number) hold one entry per model, computed over slices of at least
    ``MIN_ROWS`` rows, and are None where fewer than two slices are that large.
    """
    if rows:
        check_slice_fields([field], rows)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_value(row, field), []).append(row)
    order = sorted(groups, key=lambda value: (value == MISSING, -len(groups[value]), value))
    slices = {}
    for value in order:
        scored = score(groups[value])
        slices[value] = {"rows": len(groups[value]), "base": scored["base"], "tuned": scored["tuned"],
                         "too_small": len(groups[value]) < MIN_ROWS}
    if metric is None and slices:
        metric = next(iter(next(iter(slices.values()))["tuned"]))
    result = {"field": field, "metric": metric, "slices": slices, "worst": {}, "gap": {}}
    rankable = [value for value, s in slices.items() if not s["too_small"]]
    for model in ("base", "tuned"):
        result["worst"][model], result["gap"][model] = _worst_and_gap(slices, rankable, model, metric)
    return result


def _meta(row: dict) -> dict:
    """A row's metadata columns: its ``meta`` for a result row, the row itself for a plain mapping."""
    return (row["meta"] or {}) if "meta" in row else row


def missing_slice_fields(fields: list[str], rows: Iterable[dict]) -> list[str]:
    """Those of ``fields`` that no one of ``rows`` has (in its ``meta``, or as a key of its own)."""
    missing = set(fields)
    for row in rows:
        missing -= row.keys() | _meta(row).keys()
        if not missing:
            break
    return [field for field in fields if field in missing]


def check_slice_fields(fields: list[str], rows: Sequence[dict]) -> None:
    """Raise unless every slice field is a column of some evaluation row: checked when the data is
    read, before training, since the slices are computed only after it."""
    missing = missing_slice_fields(fields, rows)
    if missing and rows:
        available = sorted({key for row in rows for key in _meta(row)})
        names = ", ".join(repr(field) for field in missing)
        raise RecipeError(f"no evaluation row has the slice field{'s' if len(missing) > 1 else ''} {names}",
                          where="evaluate.slices",
                          hint=f"slice by one of: {', '.join(available) or '(no metadata columns)'}")


def _value(row: dict, field: str) -> str:
    meta = row.get("meta") or {}
    value = meta[field] if field in meta else row.get(field)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return str(value)


def _worst_and_gap(slices: dict, rankable: list[str], model: str,
                   metric: str | None) -> tuple[str | None, float | None]:
    if len(rankable) < 2:
        return None, None
    values = {value: float(slices[value][model][metric]) for value in rankable}
    gap = max(values.values()) - min(values.values())
    if gap == 0:  # every slice alike: none is the worst, and naming one would send someone looking
        return None, 0.0
    worst = max(values, key=values.get) if metric in LOWER_IS_BETTER else min(values, key=values.get)
    return worst, gap


def classification_score(rows: list[dict]) -> dict:
    """Accuracy and macro-F1 of both models on rows ``{"label", "base", "tuned"}``."""
    truth = [row["label"] for row in rows]
    labels = sorted({*truth, *(row["base"] for row in rows), *(row["tuned"] for row in rows)})

    def of(model: str) -> dict:
        scored = classification_metrics(truth, [row[model] for row in rows], labels)
        return {"accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"]}

    return {"base": of("base"), "tuned": of("tuned")}


def mean_scores(rows: list[dict]) -> dict:
    """The mean of each per-row score of both models, on rows ``{"base": {name: score}, "tuned": {...}}``."""
    return {model: {name: float(np.mean([row[model][name] for row in rows])) for name in rows[0][model]}
            for model in ("base", "tuned")}
