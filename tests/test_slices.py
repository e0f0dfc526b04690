"""Per-slice metrics: grouping, the missing slice, small slices, worst slice and gap."""

from __future__ import annotations

import pytest

from domaintune.errors import RecipeError
from domaintune.evaluate.slices import MISSING, classification_score, mean_scores, slice_metrics


def cls_rows(region, n: int, tuned_right: int, base_right: int) -> list[dict]:
    """n rows of one region; the first ``tuned_right`` / ``base_right`` are predicted correctly."""
    rows = []
    for i in range(n):
        label = "refund" if i % 2 else "billing"
        other = "billing" if label == "refund" else "refund"
        meta = {} if region is None else {"region": region}
        rows.append({"label": label, "base": label if i < base_right else other,
                     "tuned": label if i < tuned_right else other, "meta": meta})
    return rows


def test_classification_slices_by_region():
    rows = cls_rows("EU", 10, 9, 5) + cls_rows("US", 20, 12, 14) + cls_rows("APAC", 6, 6, 2)
    result = slice_metrics(rows, "region", classification_score)
    assert result["field"] == "region" and result["metric"] == "accuracy"
    assert list(result["slices"]) == ["US", "EU", "APAC"]  # largest first
    eu = result["slices"]["EU"]
    assert eu["rows"] == 10 and not eu["too_small"]
    assert eu["tuned"]["accuracy"] == pytest.approx(0.9)
    assert eu["base"]["accuracy"] == pytest.approx(0.5)
    assert result["worst"] == {"tuned": "US", "base": "APAC"}
    assert result["gap"]["tuned"] == pytest.approx(1.0 - 0.6)
    assert result["gap"]["base"] == pytest.approx(0.7 - 2 / 6)


def test_missing_values_form_their_own_slice_and_small_slices_are_not_ranked():
    rows = (cls_rows("EU", 8, 8, 8) + cls_rows("US", 8, 4, 4) + cls_rows(None, 3, 0, 0)
            + [{"label": "a", "base": "a", "tuned": "a", "meta": {"region": ""}},
               {"label": "a", "base": "a", "tuned": "b", "meta": {"region": None}},
               {"label": "a", "base": "a", "tuned": "b", "meta": {"region": float("nan")}},
               cls_rows("LATAM", 2, 0, 0)[0]])
    result = slice_metrics(rows, "region", classification_score)
    assert list(result["slices"])[-1] == MISSING
    assert result["slices"][MISSING]["rows"] == 6
    assert result["slices"][MISSING]["too_small"] is False
    assert result["slices"]["LATAM"]["rows"] == 1 and result["slices"]["LATAM"]["too_small"] is True
    # LATAM scores 0 but has one row: it is reported, the worst ranked slice is still a large one
    assert result["slices"]["LATAM"]["tuned"]["accuracy"] == 0.0
    assert result["worst"]["tuned"] == MISSING
    assert sum(s["rows"] for s in result["slices"].values()) == len(rows)


def test_field_read_from_meta_then_from_the_row():
    rows = [{"label": "a", "base": "a", "tuned": "a", "channel": "email", "meta": {}} for _ in range(5)]
    rows += [{"label": "a", "base": "a", "tuned": "b", "meta": {"channel": 7}} for _ in range(5)]
    result = slice_metrics(rows, "channel", classification_score)
    assert set(result["slices"]) == {"email", "7"}
    assert result["worst"]["tuned"] == "7"


def test_one_rankable_slice_has_no_worst_or_gap():
    result = slice_metrics(cls_rows("EU", 10, 9, 5) + cls_rows("US", 4, 0, 0), "region", classification_score)
    assert result["worst"] == {"base": None, "tuned": None}
    assert result["gap"] == {"base": None, "tuned": None}


def test_generation_rows_with_mean_scores_and_lower_is_better():
    def row(region: str, em: float, ppl: float) -> dict:
        return {"base": {"exact_match": 0.0, "perplexity": 10.0},
                "tuned": {"exact_match": em, "perplexity": ppl}, "meta": {"region": region}}

    rows = [row("EU", 1.0, 4.0)] * 5 + [row("US", 0.0, 9.0)] * 4 + [row("US", 1.0, 7.0)] * 2 + [row("EU", 0.0, 6.0)] * 5
    result = slice_metrics(rows, "region", mean_scores)
    assert result["metric"] == "exact_match"
    assert result["slices"]["EU"]["tuned"] == {"exact_match": 0.5, "perplexity": 5.0}
    assert result["worst"]["tuned"] == "US"
    assert result["gap"]["tuned"] == pytest.approx(0.5 - 1 / 3)
    by_ppl = slice_metrics(rows, "region", mean_scores, metric="perplexity")
    assert by_ppl["worst"]["tuned"] == "US"  # higher perplexity is worse
    assert by_ppl["gap"]["tuned"] == pytest.approx(25 / 3 - 5.0)


def test_unknown_field_lists_the_metadata_fields():
    with pytest.raises(RecipeError) as caught:
        slice_metrics(cls_rows("EU", 5, 5, 5), "regoin", classification_score)
    assert "regoin" in caught.value.message and "region" in caught.value.hint


def test_no_rows():
    assert slice_metrics([], "region", classification_score)["slices"] == {}


def test_no_slice_is_named_the_worst_when_all_score_the_same():
    from domaintune.evaluate.report import _slice_table

    rows = [{"label": "a", "base": "a", "tuned": "a", "meta": {"region": region}} for region in ("EU", "US") * 5]
    rows += [{"label": "a", "base": "b", "tuned": "a", "meta": {"region": "EU"}} for _ in range(5)]
    result = slice_metrics(rows, "region", classification_score)
    assert result["worst"]["tuned"] is None and result["gap"]["tuned"] == 0.0  # both regions all right
    assert result["worst"]["base"] == "EU" and result["gap"]["base"] > 0
    assert "every slice scores the same (base: EU, gap" in _slice_table(result)
