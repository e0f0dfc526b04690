"""Feedback records as training rows: which records become rows, and why the others do not."""

from __future__ import annotations

from domaintune.serve.feedback import FeedbackRecord
from domaintune.update.feedback_rows import feedback_rows


def correction(id: str, response: str, label: str | None, reviewer: str, at: str) -> FeedbackRecord:
    return FeedbackRecord(id=id, response_id=response, model="intents", prompt="you charged my card twice",
                          answer="payment_failed", rating=None if label else 4, correction=label, reviewer=reviewer,
                          comment=None, created_at=at)


def test_the_latest_correction_of_a_response_stands_and_the_replaced_one_is_named():
    records = [correction("fb-2", "r1", "reset_password", "carol", "2026-06-02T09:00:00+00:00"),
               correction("fb-1", "r1", "account_locked", "bob", "2026-06-01T09:00:00+00:00"),
               correction("fb-3", "r1", None, "dan", "2026-06-03T09:00:00+00:00"),  # a rating: corrects nothing
               correction("fb-4", "r2", "card_charged_twice", "bob", "2026-06-01T10:00:00+00:00")]

    rows = feedback_rows(records, "classification", used=set())

    assert [(r["label"], r["reviewer"]) for r in rows.rows] == [("reset_password", "carol"),
                                                                ("card_charged_twice", "bob")]
    assert rows.skipped == {"superseded by a later correction of the same response (fb-1 by bob -> fb-2 by carol)": 1,
                            "no correction": 1}


def test_corrections_of_different_responses_are_all_rows():
    records = [correction(f"fb-{i}", f"r{i}", "billing", "ana", f"2026-06-0{i}T00:00:00+00:00") for i in range(1, 4)]
    assert len(feedback_rows(records, "classification", used=set()).rows) == 3
