"""Feedback captured by the server, as training rows.

A correction becomes a row of the model's task: a relabelled text for classification, a chat
with the corrected answer for sft. Each row carries ``source: feedback:<id>`` and the reviewer,
so lineage says where it came from. Feedback a row cannot be made from (a rating alone, a batch
of texts answered at once, or a pretraining model) is counted, not used, and so is a correction
that a later one of the same response replaced.

With ``preference`` an sft correction of an answer rated bad (``BAD_RATING`` or lower) is also a
preference pair: the correction chosen over the answer the server gave, which is kept in
``FeedbackRows.rejected`` under the feedback id.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from domaintune.errors import DomaintuneError
from domaintune.serve.feedback import FeedbackRecord

BAD_RATING = 2  # of 1 (worst) to 5: the served answer was wrong, not merely improvable


@dataclass
class FeedbackRows:
    """The rows made from feedback, and why the other records were not used.

    The last fields say where the records came from, so that an update with nothing to train on
    can say why: whether feedback was asked for at all, the file read, how many records it had
    about the model, and (only when it had none) the other model names it has records under, with
    their counts, and which of those no registered model has: feedback written under the name a
    model was served as is lost to an update that looks under the registry name."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, str] = field(default_factory=dict)  # feedback id -> the served answer of a pair
    asked: bool = False
    store: str = ""
    records: int = 0
    elsewhere: dict[str, int] = field(default_factory=dict)
    unregistered: list[str] = field(default_factory=list)


def parse_since(text: str) -> datetime:
    """An ISO date or time (UTC unless it says otherwise)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DomaintuneError(f"{text!r} is not a date", where="--since",
                              hint="write an ISO date or time, e.g. 2025-06-01 or 2025-06-01T14:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def feedback_rows(records: list[FeedbackRecord], task: str, *, used: set[str],
                  since: datetime | None = None, preference: bool = False) -> FeedbackRows:
    """Training rows from ``records``, leaving out the ids in ``used`` (learned by an earlier
    version) and records older than ``since``. Classification rows are ``{text, label}``, sft rows
    ``{messages}``: the shapes of a run's processed data. With ``preference``, sft corrections of
    answers rated bad are also pairs (``rejected``)."""
    out = FeedbackRows()
    latest = _latest_corrections(records)
    for record in records:
        newer = latest.get(record.response_id)
        if record.correction and newer is not None and newer is not record:
            # Two reviewers correcting one answer differently must not train on both (the data
            # steps would keep the first as a duplicate, silently): the later correction stands.
            # The ids and reviewers say whose correction was replaced, not the texts (which are
            # redacted only later, by the data steps).
            out.skipped[f"superseded by a later correction of the same response ({record.id} by "
                        f"{record.reviewer or 'no reviewer'} -> {newer.id} by {newer.reviewer or 'no reviewer'})"] += 1
        elif record.id in used:
            out.skipped["used by an earlier version"] += 1
        elif since is not None and parse_since(record.created_at) < since:
            out.skipped["older than --since"] += 1
        elif not record.correction:
            out.skipped["no correction"] += 1
        elif task == "pretrain":
            out.skipped["pretraining takes no corrections"] += 1
        elif task == "classification" and _is_batch(record.prompt):
            out.skipped["batch request"] += 1
        else:
            body = ({"text": record.prompt, "label": record.correction} if task == "classification" else
                    {"messages": [*_messages(record.prompt), {"role": "assistant", "content": record.correction}]})
            out.rows.append({**body, "source": f"feedback:{record.id}", "reviewer": record.reviewer or "",
                             # the id: a response can be corrected more than once
                             "origin": f"feedback {record.id} (response {record.response_id})"})
            if preference and task == "sft" and _is_pair(record):
                out.rejected[record.id] = record.answer
    return out


def _latest_corrections(records: list[FeedbackRecord]) -> dict[str, FeedbackRecord]:
    """Per response, its latest correction (by time, then by order in ``records``)."""
    latest: dict[str, FeedbackRecord] = {}
    for record in sorted((r for r in records if r.correction), key=lambda r: r.created_at):  # stable
        latest[record.response_id] = record
    return latest


def _is_pair(record: FeedbackRecord) -> bool:
    """Rated bad, and corrected to something else: a preference between two answers."""
    return (record.rating is not None and record.rating <= BAD_RATING
            and record.answer.strip() != record.correction.strip())


def _is_batch(prompt: str) -> bool:
    """The server stores a batch of texts classified at once as a JSON list."""
    try:
        return isinstance(json.loads(prompt), list)
    except ValueError:
        return False


def _messages(prompt: str) -> list[dict[str, str]]:
    """A chat prompt is stored as its messages in JSON, a completion prompt as plain text."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages):
        return [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    return [{"role": "user", "content": prompt}]
