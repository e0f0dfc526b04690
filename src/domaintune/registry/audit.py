"""The audit log: append-only entries, each carrying the hash of the one before it.

What ``verify_chain`` detects: an entry edited in place (its hash no longer matches), an entry
deleted from the middle (a gap in seq), an entry whose link to its predecessor was rewritten, and
entries deleted from the end (the head record, updated in the same transaction as every append,
names a later seq or another hash). What it cannot detect: someone with write access who rewrites
an entry AND recomputes every later hash and the head, since the chain has no secret. Against that,
keep a copy of the head hash elsewhere (``domaintune registry audit`` prints it): a chain that was
rewritten no longer leads to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from domaintune.registry.schema import AuditHead, AuditRow

ACTIONS = ("register", "promote", "promote-refused", "rollback", "deploy", "delete")
GENESIS = "0" * 64
HEAD_ID = 1


@dataclass(frozen=True)
class AuditEntry:
    """Who did what to which model version, when, and why."""

    seq: int
    time: str
    actor: str
    action: str
    target: str
    reason: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        return cls(row.seq, row.time, row.actor, row.action, row.target, row.reason, json.loads(row.details),
                   row.prev_hash, row.hash)


@dataclass(frozen=True)
class AuditReport:
    """The result of walking the chain; ``broken_seq`` is the first entry found wrong."""

    entries: int
    head_hash: str
    broken_seq: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(row: AuditRow) -> str:
    """sha256 of the canonical JSON of every column but the hash itself."""
    fields = {"seq": row.seq, "time": row.time, "actor": row.actor, "action": row.action, "target": row.target,
              "reason": row.reason, "details": row.details, "prev_hash": row.prev_hash}
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def append(session: Session, *, actor: str, action: str, target: str, reason: str | None,
           details: dict[str, Any]) -> AuditRow:
    """Add an entry after the current head. The caller holds the registry's write lock, which is
    what makes "read head, write entry, move head" safe against other writers."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; expected one of {ACTIONS}")
    head = session.get(AuditHead, HEAD_ID)
    if head is None:
        head = AuditHead(id=HEAD_ID, seq=0, hash=GENESIS)
        session.add(head)
    row = AuditRow(seq=head.seq + 1, time=datetime.now(timezone.utc).isoformat(), actor=actor, action=action,
                   target=target, reason=reason, details=canonical_json(details), prev_hash=head.hash)
    row.hash = entry_hash(row)
    session.add(row)
    head.seq, head.hash = row.seq, row.hash
    session.flush()
    return row


def verify_chain(session: Session) -> AuditReport:
    """Walk the log from the first entry and report the first place the chain breaks."""
    expected, previous = 1, GENESIS
    for row in session.scalars(select(AuditRow).order_by(AuditRow.seq)):
        if row.seq != expected:
            missing = f"{expected}" if row.seq == expected + 1 else f"{expected}-{row.seq - 1}"
            return AuditReport(expected - 1, previous, expected, f"entry {missing} was deleted (seq jumps to {row.seq})")
        if row.prev_hash != previous:
            return AuditReport(expected - 1, previous, row.seq,
                               f"entry {row.seq} does not link to entry {row.seq - 1}: one of them was changed")
        if entry_hash(row) != row.hash:
            return AuditReport(expected - 1, previous, row.seq, f"entry {row.seq} was changed after it was written")
        expected, previous = expected + 1, row.hash
    last = expected - 1
    head = session.get(AuditHead, HEAD_ID)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    if head_seq > last:
        return AuditReport(last, previous, last + 1, f"entries {last + 1}-{head_seq} were deleted from the end of the log")
    if head_seq < last:
        return AuditReport(last, previous, head_seq + 1, f"entries after {head_seq} were added outside the registry")
    if head_hash != previous:
        return AuditReport(last, previous, last, f"entry {last} does not match the recorded head of the log")
    return AuditReport(last, previous)
