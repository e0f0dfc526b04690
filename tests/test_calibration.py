"""Calibration error, reliability bins and the confusion matrix, on cases with a known answer."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from domaintune.evaluate.calibration import (confusion_html, confusion_matrix, expected_calibration_error,
                                             reliability_bins, reliability_svg)


def test_perfectly_calibrated_model_has_ece_near_zero():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0, 1, 200_000)
    correct = rng.random(confidences.size) < confidences  # right exactly as often as it claims
    assert expected_calibration_error(confidences, correct) < 0.01


def test_overconfident_model_by_hand():
    # 10 rows at 0.95 of which 6 are right, 10 rows at 0.55 of which 5 are right:
    # ECE = 0.5 * |0.6 - 0.95| + 0.5 * |0.5 - 0.55| = 0.175 + 0.025 = 0.2
    confidences = [0.95] * 10 + [0.55] * 10
    correct = [1] * 6 + [0] * 4 + [1] * 5 + [0] * 5
    assert expected_calibration_error(confidences, correct, n_bins=10) == pytest.approx(0.2)


def test_always_right_but_unsure_is_underconfident():
    assert expected_calibration_error([0.6] * 8, [True] * 8) == pytest.approx(0.4)


def test_bins_add_up_and_hold_their_rows():
    rng = np.random.default_rng(3)
    confidences = np.concatenate([rng.uniform(0, 1, 997), [0.0, 1.0, 0.5]])
    correct = rng.random(confidences.size) < 0.7
    bins = reliability_bins(confidences, correct, n_bins=15)
    assert len(bins) == 15
    assert sum(b["count"] for b in bins) == confidences.size
    assert bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    for b in bins:
        members = [c for c in confidences if b["lo"] <= c < b["hi"] or (c == 1.0 and b["hi"] == 1.0)]
        assert b["count"] == len(members)
        if members:
            assert b["confidence"] == pytest.approx(np.mean(members))
            assert b["lo"] <= b["confidence"] <= b["hi"]


def test_empty_bins_have_no_means():
    bins = reliability_bins([0.91, 0.92], [1, 0], n_bins=10)
    assert [b["count"] for b in bins] == [0] * 9 + [2]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    assert bins[-1]["accuracy"] == 0.5


def test_bad_input():
    with pytest.raises(ValueError):
        reliability_bins([0.5, 1.2], [1, 0])
    with pytest.raises(ValueError):
        reliability_bins([0.5], [1, 0])
    with pytest.raises(ValueError):
        expected_calibration_error([], [])


def test_reliability_svg_is_self_contained_xml_with_a_bar_per_filled_bin():
    bins = reliability_bins([0.1, 0.15, 0.55, 0.95, 0.97], [0, 1, 1, 1, 0], n_bins=10)
    svg = reliability_svg(bins, title="tuned <model>")
    root = ET.fromstring(svg)  # well-formed, title escaped
    assert root.tag.endswith("svg")
    tooltip = "{http://www.w3.org/2000/svg}title"
    bars = [e for e in root.iter() if e.tag.endswith("rect") and e.find(tooltip) is not None]
    assert len(bars) == 3
    assert "href" not in svg and "http://www.w3.org/2000/svg" in svg


def test_confusion_matrix_rows_are_truth():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "c", "c"]
    assert confusion_matrix(truth, pred, ["a", "b", "c"]) == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    assert confusion_matrix(truth, pred, ["c", "b", "a"]) == [[1, 0, 0], [1, 1, 0], [0, 2, 1]]


def test_confusion_html_shades_by_row_share_and_escapes():
    table = confusion_html([[3, 1], [0, 4]], ["<refund>", "billing"])
    assert "&lt;refund&gt;" in table and "<refund>" not in table
    assert "rgba(74,120,194,0.75)" in table  # 3 of 4 on the diagonal
    assert "rgba(163,18,27,0.25)" in table   # 1 of 4 off it
    assert "rgba(74,120,194,1.00)" in table
    assert table.count("<tr>") == 3
