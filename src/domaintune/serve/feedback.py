"""Feedback on served answers, kept for the update loop.

The server remembers its recent responses (``ResponseLog``, bounded) so that feedback can name
a response id alone; each feedback record is appended to a SQLite file (``FeedbackStore``) with
the model, prompt and answer it is about. Records are never changed or deleted here.

A record's ``model`` is the registry name of the model that answered (its run's recipe ``name``),
which ``domaintune update NAME --feedback`` looks records up by, whatever name the request used:
that is ``alias``. ``version`` is the registry's ``name:N`` when the server knew it, ``run_id``
the run directory's name, and ``key`` the name of the API key the feedback came with (``reviewer``
is only what the caller claims).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from domaintune import catalog


@dataclass(frozen=True)
class Response:
    """What the server answered: the model's registry name, the prompt (text, or chat messages as
    JSON) and the answer, as the client saw them (after redaction, where it is on); the name the
    request used, the registry version and run; for a classifier its labels, and how many inputs
    the response answered (feedback takes responses to one)."""

    model: str
    prompt: str
    answer: str
    alias: str | None = None  # None: the request used ``model``
    version: str | None = None
    run_id: str | None = None
    labels: tuple[str, ...] | None = None
    inputs: int = 1

    @property
    def route(self) -> str:
        """The name the request called the model by (what API keys are scoped to)."""
        return self.alias or self.model


class ResponseLog:
    """The last ``capacity`` responses by id; older ones are forgotten."""

    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._items: OrderedDict[str, Response] = OrderedDict()

    def add(self, response_id: str, response: Response) -> None:
        self._items[response_id] = response
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Response | None:
        return self._items.get(response_id)


@dataclass(frozen=True)
class FeedbackRecord:
    """One piece of feedback; ``rating`` (1 worst to 5 best) and ``correction`` (the answer the
    model should have given) are each optional, but not both."""

    id: str
    response_id: str
    model: str
    prompt: str
    answer: str
    rating: int | None
    correction: str | None
    reviewer: str | None
    comment: str | None
    created_at: str
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    key: str | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY,
    response_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    rating INTEGER,
    correction TEXT,
    reviewer TEXT,
    comment TEXT,
    created_at TEXT NOT NULL,
    alias TEXT,
    version TEXT,
    run_id TEXT,
    "key" TEXT
)
"""
_ADDED_COLUMNS = ("alias", "version", "run_id", "key")  # after the first release: added to older files on open
_FIELDS = [f.name for f in fields(FeedbackRecord)]


def default_feedback_path() -> Path:
    return catalog.home() / "feedback.db"


class FeedbackStore:
    """Append-only feedback records in a SQLite file (created on first use)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_feedback_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (the update loop) never block the server
        self._db.execute(_SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        """Bring a file written before the newer columns up to date (its old rows keep NULL there)."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(feedback)")}
        for column in _ADDED_COLUMNS:
            if column in present:
                continue
            try:
                self._db.execute(f'ALTER TABLE feedback ADD COLUMN "{column}" TEXT')
            except sqlite3.OperationalError as exc:  # another process opening the file added it first
                if "duplicate column" not in str(exc):
                    raise

    def add(self, response_id: str, response: Response, *, rating: int | None = None, correction: str | None = None,
            reviewer: str | None = None, comment: str | None = None, key: str | None = None) -> FeedbackRecord:
        """Append feedback about ``response`` and return the stored record; ``key`` is the name of
        the API key it came with (None without authentication)."""
        record = FeedbackRecord(id="fb-" + secrets.token_hex(12), response_id=response_id, model=response.model,
                                prompt=response.prompt, answer=response.answer, rating=rating, correction=correction,
                                reviewer=reviewer, comment=comment,
                                created_at=datetime.now(timezone.utc).isoformat(), alias=response.route,
                                version=response.version, run_id=response.run_id, key=key)
        row = asdict(record)
        columns = ", ".join(f'"{c}"' for c in row)
        with self._lock:
            self._db.execute(f"INSERT INTO feedback ({columns}) VALUES ({', '.join('?' * len(row))})",
                             list(row.values()))
        return record

    def records(self, model: str | None = None) -> list[FeedbackRecord]:
        """All records, oldest first; optionally those about one model (its registry name)."""
        columns = ", ".join(f'"{c}"' for c in _FIELDS)
        where = " WHERE model = ?" if model else ""
        query = f"SELECT {columns} FROM feedback{where} ORDER BY created_at, rowid"
        with self._lock:
            rows = self._db.execute(query, [model] if model else []).fetchall()
        return [FeedbackRecord(**dict(zip(_FIELDS, row))) for row in rows]

    def close(self) -> None:
        self._db.close()


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """How a chat prompt is stored: its messages as JSON."""
    return json.dumps(messages, ensure_ascii=False)
