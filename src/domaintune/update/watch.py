"""Continuous updates: watch a folder for new data files (and, optionally, the server for new
feedback) and run an update whenever enough new rows have arrived.

    DIR/*.csv *.jsonl ... ──complete?──▶ count rows ─┐
    new feedback corrections (--feedback) ───────────┴─ ≥ min_rows ──▶ update(those files, feedback)
        ──▶ record the outcome, mark them all taken

What the watcher knows lives in ``DIR/.domaintune-watch.json`` (written whole and replaced, so a
crash never leaves half of it): the files taken, by name, with their sha256 and row count; the
feedback cut-off (the newest correction already taken); the rows waiting at the last poll; and
every update with its files and outcome (promoted, staged, rejected with the failing gate
clauses, or error with its message). A lock file beside it keeps two watchers off one folder.

Rules a user can rely on:

* Complete files only. A file is counted once its size and modification time are the same at two
  polls in a row, so a file still being copied in is left for a later poll. Names starting with
  "." and types the readers do not know (``tickets.csv.part``) are never looked at: writing under
  such a name and renaming into place when done is the safest way to drop a file.
* Every batch is taken once, whatever its outcome. A rejected or failed update marks its files and
  feedback as taken, so that a bad batch is not trained on again at every poll; to try those rows
  again, pass the files to a plain ``domaintune update --data``.
* A file whose content was already taken (same sha256, under any name) adds nothing. A taken file
  that changes is new content and is taken again, whole: drop new rows in new files.
* A file that cannot be read, or has no rows, is set aside (the reason in the state file) rather
  than spoiling the batch it would join; fix it and drop it again.
* An update that is interrupted (Ctrl-C, a crash) is not recorded: its files are taken again at
  the next poll.
* Rows are counted as they are in the files, before cleaning and deduplication: an update may
  train on fewer than ``min_rows``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from rich.console import Console

from domaintune.data.readers import SUPPORTED, read_rows
from domaintune.errors import DataError, DomaintuneError
from domaintune.registry.store import Registry
from domaintune.serve.feedback import FeedbackRecord, FeedbackStore
from domaintune.update.assemble import ancestors
from domaintune.update.feedback_rows import feedback_rows, parse_since
from domaintune.update.updater import UpdateResult, feedback_records, feedback_used, update

STATE = ".domaintune-watch.json"
LOCK = ".domaintune-watch.lock"
OUTCOMES = {"production": "promoted", "staging": "staged", "archived": "rejected"}


@dataclass
class Poll:
    """What one look at the folder found, and the update it ran (if any)."""

    min_rows: int
    files: dict[str, int] = field(default_factory=dict)  # complete, untaken files waiting: name -> rows
    feedback_rows: int = 0
    # with no feedback under the model's names: records under names no registered model has (a server
    # that stored the name it served the model as), name -> records; not counted without --feedback-name
    feedback_elsewhere: dict[str, int] = field(default_factory=dict)
    settling: list[str] = field(default_factory=list)  # new or changed since the last poll: counted later
    set_aside: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be used
    update: dict[str, Any] | None = None  # the record of the update this poll ran
    result: UpdateResult | None = None  # its result, when it got as far as one

    @property
    def waiting_rows(self) -> int:
        return sum(self.files.values()) + self.feedback_rows

    def summary(self) -> dict[str, Any]:
        return {"waiting_rows": self.waiting_rows, "min_rows": self.min_rows, "files": self.files,
                "feedback_rows": self.feedback_rows, "feedback_elsewhere": self.feedback_elsewhere,
                "settling": self.settling, "set_aside": self.set_aside,
                "update": self.update}


class Watcher:
    """Watches ``directory`` for new rows for model ``name``; ``poll()`` looks once and runs an
    update when ``min_rows`` have arrived. ``update_options`` go to
    :func:`domaintune.update.updater.update` as they are (gate, promote, output_dir, ...).
    With ``feedback``, new corrections in ``feedback_db`` count as rows too (those stored under
    ``name`` and under each of ``feedback_names``); ``since`` says where they start until the first
    update sets the cut-off.

    Use it as a context manager: it holds the folder's lock while open.
    """

    def __init__(self, name: str, directory: str | Path, *, min_rows: int = 100, feedback: bool = False,
                 feedback_db: str | Path | None = None, feedback_names: Sequence[str] = (), since: str | None = None,
                 registry_url: str | None = None, console: Console | None = None, **update_options: Any):
        self.name = name
        self.directory = Path(directory)
        self.min_rows = min_rows
        self.feedback = feedback
        self.feedback_db = feedback_db
        self.feedback_names = list(feedback_names)
        self.since = since
        self.registry_url = registry_url
        self.console = console or Console(stderr=True, quiet=True)
        self.update_options = update_options
        if not self.directory.is_dir():
            raise DataError(f"{self.directory} is not a folder", where="--watch",
                            hint="create it, and drop the files of new rows into it")
        self._lock = FileLock(self.directory / LOCK)

    @property
    def state_file(self) -> Path:
        return self.directory / STATE

    def __enter__(self) -> Watcher:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise DomaintuneError("another watcher is at work on this folder", where=str(self.directory),
                                  hint="let it finish (an update can take a while), or stop it first") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def state(self) -> dict[str, Any]:
        """The state file's content (an empty state before the first poll)."""
        if not self.state_file.is_file():
            return {"model": self.name, "taken": {}, "seen": {}, "feedback_after": None, "waiting": None, "updates": []}
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"the watch state is not valid JSON: {exc}", where=str(self.state_file),
                            hint="restore it, or delete it to start over (every file in the folder is new again)"
                            ) from None
        if state.get("model") != self.name:
            raise DomaintuneError(f"this folder is watched for {state.get('model')!r}, not {self.name!r}",
                                  where=str(self.state_file), hint="give each model a folder of its own")
        return state

    def poll(self) -> Poll:
        """Look once: note new files, count the rows of complete ones and new feedback, and run an
        update on all of them if there are at least ``min_rows``. Saves the state either way."""
        state = self.state()
        poll = Poll(self.min_rows)
        ready = self._look(state, poll)
        corrections = self._new_feedback(state, poll) if self.feedback else []
        poll.feedback_rows = len(corrections)
        state["waiting"] = _waiting(poll)
        self.console.print(f"{self.name}: {progress_line(poll)}", highlight=False, soft_wrap=True)
        if poll.waiting_rows >= self.min_rows:
            self._update(state, poll, ready, corrections)
        self._save(state)
        return poll

    def _look(self, state: dict[str, Any], poll: Poll) -> list[Path]:
        """Fill ``poll`` with the folder's files; returns the complete, untaken ones."""
        taken, seen = state["taken"], state["seen"]
        shas = {entry["sha256"]: name for name, entry in taken.items()}
        ready, present = [], set()
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in SUPPORTED or not path.is_file():
                continue
            present.add(path.name)
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
            done = taken.get(path.name)
            if done is not None and (done["size"], done["mtime_ns"]) == (size, mtime):
                continue
            sighting = seen.get(path.name)
            if sighting is None or (sighting["size"], sighting["mtime_ns"]) != (size, mtime):
                seen[path.name] = {"size": size, "mtime_ns": mtime}
                poll.settling.append(path.name)
                continue
            if "sha256" not in sighting:  # complete: hash and count once, not at every poll
                sighting["sha256"] = _sha256(path)
                try:
                    sighting["rows"] = len(read_rows(path))
                except DomaintuneError as exc:
                    sighting["error"] = str(exc)
            entry = {"sha256": sighting["sha256"], "size": size, "mtime_ns": mtime}
            if "error" in sighting:
                taken[path.name] = {**entry, "rows": 0, "set_aside": sighting["error"], "at": _now()}
                poll.set_aside[path.name] = sighting["error"]
            elif sighting["sha256"] in shas:
                taken[path.name] = {**entry, "rows": 0, "duplicate_of": shas[sighting["sha256"]], "at": _now()}
            else:
                poll.files[path.name] = sighting["rows"]
                shas[sighting["sha256"]] = path.name  # a copy of it beside it adds nothing either
                ready.append(path)
                continue
            del seen[path.name]
        state["seen"] = {name: s for name, s in seen.items() if name in present}
        return ready

    def _new_feedback(self, state: dict[str, Any], poll: Poll) -> list[FeedbackRecord]:
        """The corrections an update would train on that are newer than the cut-off, oldest first.
        With none stored under the model's names, notes in ``poll`` the unregistered names that
        hold feedback (a server's name for the model, perhaps), as ``update --feedback`` does."""
        with Registry(self.registry_url) as registry:
            production = registry.get(self.name, "production")
            registered = {v.name for v in registry.list()}
        used = feedback_used(ancestors(production.ref, production.run_dir))  # learned earlier: not new
        records = self._feedback_records()
        if not records:
            poll.feedback_elsewhere = {m: n for m, n in self._feedback_by_model().items() if m not in registered}
        after = state["feedback_after"]
        if after is not None:
            records = [r for r in records if parse_since(r.created_at) > parse_since(after)]
        usable = feedback_rows(records, production.task, used=used,
                               since=parse_since(self.since) if self.since and after is None else None)
        ids = {row["source"].removeprefix("feedback:") for row in usable.rows}
        return [r for r in records if r.id in ids]

    def _update(self, state: dict[str, Any], poll: Poll, files: list[Path], corrections: list[FeedbackRecord]) -> None:
        """Run the update on ``files`` and ``corrections``, record its outcome and take them all."""
        record: dict[str, Any] = {
            "started_at": _now(), "files": [{"name": p.name, "sha256": state["seen"][p.name]["sha256"],
                                             "rows": poll.files[p.name]} for p in files],
            "feedback_rows": len(corrections), "outcome": None, "version": None, "run_dir": None,
            "failing": [], "error": None}
        self.console.print(f"{self.name}: updating with {poll.waiting_rows} new rows", highlight=False, soft_wrap=True)
        used_feedback: list[str] = []
        try:
            result = update(self.name, files, feedback=bool(corrections), feedback_db=self.feedback_db,
                            feedback_names=self.feedback_names,
                            since=corrections[0].created_at if corrections else None,
                            registry_url=self.registry_url, console=self.console, **self.update_options)
        except DomaintuneError as exc:
            record.update(outcome="error", error=str(exc))
        else:
            poll.result = result
            used_feedback = result.assembly.feedback_ids
            record.update(outcome=OUTCOMES[result.stage], version=result.registered, run_dir=str(result.run_dir),
                          failing=result.failing)
        record["finished_at"] = _now()
        state["updates"].append(record)
        poll.update = record
        for path in files:
            sighting = state["seen"].pop(path.name)
            state["taken"][path.name] = {**sighting, "at": record["finished_at"], "update": len(state["updates"]) - 1}
        state["feedback_after"] = self._cut_off(state["feedback_after"], corrections, used_feedback)
        state["waiting"] = _waiting(Poll(self.min_rows, settling=poll.settling))

    def _cut_off(self, current: str | None, corrections: list[FeedbackRecord], used: list[str]) -> str | None:
        """The newest of the corrections counted and those the update used (some may have come in
        between): everything up to it is taken."""
        times = [r.created_at for r in corrections]
        if used:
            times += [r.created_at for r in self._feedback_records() if r.id in set(used)]
        return max(times, key=parse_since, default=current)

    def _feedback_records(self) -> list[FeedbackRecord]:
        store = FeedbackStore(self.feedback_db)
        try:
            return feedback_records(store, self.name, self.feedback_names)
        finally:
            store.close()

    def _feedback_by_model(self) -> dict[str, int]:
        store = FeedbackStore(self.feedback_db)
        try:
            return dict(sorted(Counter(r.model for r in store.records()).items()))
        finally:
            store.close()

    def _save(self, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=STATE + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
        os.replace(tmp, self.state_file)


def progress_line(poll: Poll) -> str:
    """One line per poll: ``40 of 100 rows waiting (2 files, 3 feedback)``, then the files not
    counted yet and those set aside."""
    line = (f"{poll.waiting_rows} of {poll.min_rows} rows waiting "
            f"({len(poll.files)} file{'s' * (len(poll.files) != 1)}, {poll.feedback_rows} feedback)")
    if poll.settling:
        line += f"; not counted until unchanged at the next poll: {', '.join(poll.settling)}"
    if poll.feedback_elsewhere:
        listed = ", ".join(f"{model} ({n})" for model, n in poll.feedback_elsewhere.items())
        line += (f"; feedback not counted, stored under a name no registered model has: {listed} "
                 "(if that is the name the server served this model as, add --feedback-name)")
    if poll.set_aside:
        line += "; set aside: " + "; ".join(f"{name} ({why.splitlines()[0]})" for name, why in poll.set_aside.items())
    return line


def _waiting(poll: Poll) -> dict[str, Any]:
    return {"rows": poll.waiting_rows, "files": poll.files, "feedback_rows": poll.feedback_rows,
            "settling": poll.settling, "checked_at": _now()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
