"""The data steps for files too large to hold in memory, in three passes over disk:

1. Stream the rows through validate → clean → redact PII in worker processes (chunks of rows,
   results in file order), spooling each kept example as a JSON line and keeping only numbers
   per row in memory: its offset in the spool, label, split value and lengths; the exact keys,
   MinHash band hashes and shingle sets go to files (``data.dedup_index``).
2. Decide duplicates and leaks one block of rows at a time, reading back only the shingle sets
   of candidates; split (``data.array_split``); find the eval rows that overlap training rows
   (containment, ``data.dedup.find_contained``), again by blocks.
3. Check eval labels, and copy the spooled lines to ``data/train.jsonl`` and ``data/eval.jsonl``,
   the dropped ones with their reasons to ``data/quarantine.jsonl`` when asked, and write the card.

Memory grows by some 30 bytes per row while reading (plus 8 with a group or time split), and
while deciding duplicates by 17 bytes per row, 12 per distinct text and at most 8 per LSH band
for each row kept (``data.dedup_index``), not with the text and not with the number of
near-duplicate candidates; while looking for eval rows that overlap training rows, by 21 bytes per
row and at most 128 per indexed row (the eval rows, then 4 blocks of training rows), plus some 100 MB
of fixed tables and block arrays (``data.dedup.find_contained``). The per-row steps are
``data.steps.RowSteps``, the ones ``prepare`` runs; see ``data.prepare`` for where the results can
differ from it. Rows dropped by one of the first two steps are kept in no list: the card counts
them, and ``data/quarantine.jsonl`` holds them when ``on_bad_rows: quarantine``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.text import Text

from domaintune.catalog import sha256_file
from domaintune.data.array_split import group_mask, holdout_mask, time_mask
from domaintune.data.card import DroppedTally, SideSummary, card_from_tallies, write_card
from domaintune.data.dedup import containment_kind, containment_of, containment_reason, find_contained
from domaintune.data.dedup_index import Decisions, FingerprintStore, Fingerprints, find_duplicates, fingerprint
from domaintune.data.readers import Row, iter_rows
from domaintune.data.steps import Dropped, Example, RowSteps, as_fields, duplicate_dropped, from_fields, key_text, \
    make_redactor, overlap_hint, raise_bad_rows, split_field, texts, time_cutoff, time_value
from domaintune.errors import DataError
from domaintune.progress import Progress
from domaintune.recipe import Recipe

CHUNK_ROWS = 256  # rows per task sent to a worker: large enough to amortise pickling
_IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: bounds what is read ahead of the workers
_BAD_ROWS_LISTED = 5


def prepare_streaming(spec: Recipe, root: Path, directory: Path, console: Console | None = None,
                      workers: int | None = None, *, require_rows: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """Run the data steps of ``spec`` (paths relative to ``root``) and write the results to
    ``directory`` as ``write_prepared`` does. Returns the card and the processed files.
    ``workers``: processes for the per-row steps (default: the CPUs this process may use).
    ``require_rows``: as for ``prepare``."""
    console = console or Console(stderr=True, quiet=True)
    workers = workers or len(os.sched_getaffinity(0))
    d = spec.data
    sources = {"train": root / d.train, **({"eval": root / d.eval} if d.eval else {})}
    make_redactor(spec)  # a missing pseudonym secret is the recipe's error: raise it before any work
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=directory.parent) as spool_dir:
        spool = _Spool(Path(spool_dir), spec)
        try:
            with _progress(console) as progress:
                for role, path in sources.items():
                    spool.read(role, path, workers, progress)
                spool.finish_reading()
                if d.on_bad_rows == "error" and spool.bad_rows:
                    raise_bad_rows(spool.bad_rows, spool.dropped.total)
                decisions = _deduplicate(spool, progress)
                kept = decisions.kept if decisions is not None else np.ones(len(spool.offsets), dtype=bool)
                is_eval = _held_out(spool, kept, "eval" in sources)
                overlaps = _contained(spool, kept & ~is_eval, kept & is_eval, progress)
            return _write(spool, decisions, kept, is_eval, overlaps, sources, directory, require_rows)
        finally:
            spool.close()


@dataclass
class _Chunk:
    """What a worker made of a chunk of rows."""

    rows: int
    lines: list[str] = field(default_factory=list)  # kept examples as rows of data/train.jsonl
    dropped: list[Dropped] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    split_values: list[float] = field(default_factory=list)  # time, or a group's hash
    chars: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    prints: Fingerprints | None = None
    changed: int = 0
    pii: Counter = field(default_factory=Counter)
    rows_with_pii: int = 0


_worker: dict[str, Any] = {}  # each worker process's RowSteps per role, built once


def _start_worker(spec: Recipe) -> None:
    _worker.clear()
    _worker["spec"] = spec
    _worker["redactor"] = make_redactor(spec)


def _work(task: tuple[str, list[Row]]) -> _Chunk:
    role, rows = task
    spec: Recipe = _worker["spec"]
    steps = _worker.get(role) or _worker.setdefault(role, RowSteps(spec, role, _worker["redactor"]))
    name = split_field(spec)
    chunk = _Chunk(len(rows))
    kept: list[Example] = []
    for row in rows:
        outcome = steps.run(row)
        if outcome.example is None:
            chunk.dropped.append(outcome.dropped)
            continue
        example = outcome.example
        kept.append(example)
        chunk.lines.append(json.dumps({**as_fields(example), "where": example.where}, ensure_ascii=False))
        chunk.labels.append(getattr(example, "label", None))
        if name:
            value = example.meta[name]
            chunk.split_values.append(time_value(value, example.where, name) if spec.data.split.by == "time"
                                      else _group_hash(value))
        held = texts(example)
        chunk.chars.append(sum(len(t) for t in held))
        chunk.words.append(sum(len(t.split()) for t in held))
        chunk.changed += outcome.changed
        chunk.pii.update(outcome.pii)
        chunk.rows_with_pii += bool(outcome.pii)
    if _fingerprinted(spec):
        chunk.prints = fingerprint([key_text(e) for e in kept], spec.data.dedup.threshold)
    return chunk


def _group_hash(value: Any) -> float:
    # A group's identity as a float64 (53 bits of a hash): the split needs equality only, and one
    # float array serves both the time and the group split.
    return float(int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest()) >> 11)


def _ordered(pool: Any, tasks: Iterable[Any], window: int) -> Iterator[_Chunk]:
    """``pool.imap(_work, tasks)`` with at most ``window`` tasks read ahead: imap itself reads its
    whole input at once, which for a large file means the whole file in memory."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(_work, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Spool:
    """The examples kept by the per-row steps, on disk, and the numbers kept of each in memory."""

    def __init__(self, directory: Path, spec: Recipe):
        self.directory = directory
        self.spec = spec
        self.path = directory / "examples.jsonl"
        self._out = open(self.path, "wb")
        self.offsets = array("q")
        self.label_ids = array("i")
        self.label_names: dict[str, int] = {}
        self.split_values = array("d")
        self.chars = array("i")  # 32 bits: a row's length, not a file's
        self.words = array("i")
        dedup = spec.data.dedup
        self.prints = FingerprintStore(directory / "fingerprints", dedup.threshold) if _fingerprinted(spec) else None
        self.rows_in: dict[str, int] = {}
        self.kept_in: dict[str, int] = {}  # examples spooled per role
        self.dropped = DroppedTally()
        self.bad_rows: list[Dropped] = []  # the first few, for on_bad_rows: error
        self.quarantine = directory / "dropped.jsonl"
        self._quarantine = open(self.quarantine, "w", encoding="utf-8") if spec.data.on_bad_rows == "quarantine" \
            else None
        self.pii: Counter = Counter()
        self.rows_with_pii = self.cleaned_rows = 0
        self._reader: Any = None

    def read(self, role: str, path: Path, workers: int, progress: Progress) -> None:
        """Run the per-row steps over the file ``path`` and spool what they keep."""
        task = progress.add_task(f"{role}: {path.name}", total=_count_rows(path))
        steps = RowSteps(self.spec, role, None)
        chunks = ((role, chunk) for chunk in _checked(_chunks(iter_rows(path)), steps))
        before = len(self.offsets)
        self.rows_in[role] = 0
        if workers > 1:
            with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(self.spec,)) as pool:
                for chunk in _ordered(pool, chunks, workers * _IN_FLIGHT_PER_WORKER):
                    self._add(role, chunk)
                    progress.advance(task, chunk.rows)
        else:
            _start_worker(self.spec)
            for chunk in map(_work, chunks):
                self._add(role, chunk)
                progress.advance(task, chunk.rows)
        progress.update(task, total=self.rows_in[role], completed=self.rows_in[role])
        if not self.rows_in[role]:
            raise DataError("the file has no data rows", where=str(path))
        self.kept_in[role] = len(self.offsets) - before

    def _add(self, role: str, chunk: _Chunk) -> None:
        self.rows_in[role] += chunk.rows
        position = self._out.tell()
        for line in chunk.lines:
            self.offsets.append(position)
            data = line.encode("utf-8") + b"\n"
            self._out.write(data)
            position += len(data)
        for label in chunk.labels:
            self.label_ids.append(-1 if label is None else self.label_names.setdefault(label, len(self.label_names)))
        self.split_values.extend(chunk.split_values)
        self.chars.extend(chunk.chars)
        self.words.extend(chunk.words)
        if self.prints is not None and chunk.prints is not None:
            self.prints.append(chunk.prints)
        for dropped in chunk.dropped:
            self.drop(dropped)
        self.pii.update(chunk.pii)
        self.rows_with_pii += chunk.rows_with_pii
        self.cleaned_rows += chunk.changed

    def drop(self, dropped: Dropped) -> None:
        """Count a dropped row, and quarantine it when the recipe says so."""
        self.dropped.add(dropped)
        if len(self.bad_rows) < _BAD_ROWS_LISTED and dropped.step in ("validate", "clean"):
            self.bad_rows.append(dropped)
        if self._quarantine is not None:
            self._quarantine.write(json.dumps({"where": dropped.where, "source": dropped.source, "step": dropped.step,
                                               "reason": dropped.reason, "row": dropped.fields},
                                              ensure_ascii=False, default=str) + "\n")

    def finish_reading(self) -> None:
        self._out.close()
        if self.prints is not None:
            self.prints.close()
        self._reader = open(self.path, "rb")

    def line(self, row: int) -> bytes:
        """The spooled JSON line of example ``row``."""
        self._reader.seek(self.offsets[row])
        return self._reader.readline()

    def example(self, row: int) -> Example:
        return from_fields(json.loads(self.line(row)), self.spec.task)

    def lines(self) -> Iterator[bytes]:
        """Every spooled line, in order."""
        with open(self.path, "rb") as fh:
            yield from fh

    def close(self) -> None:
        for fh in (self._out, self._quarantine, self._reader):
            if fh is not None:
                fh.close()
        if self.prints is not None:
            self.prints.release()


def _chunks(rows: Iterator[Row]) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, CHUNK_ROWS)):
        yield chunk


def _checked(chunks: Iterator[list[Row]], steps: RowSteps) -> Iterator[list[Row]]:
    """The chunks, after checking the file's columns on its first readable row."""
    checked = False
    for chunk in chunks:
        if not checked and any(row.problem is None for row in chunk):
            steps.require_columns(chunk)
            checked = True
        yield chunk


def _count_rows(path: Path) -> int | None:
    """About how many rows ``path`` holds, for the progress bar: its lines (one pass at disk speed),
    a Parquet file's row count, nothing for a .json list."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".json":
        return None
    lines = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            lines += block.count(b"\n")
    return lines - (suffix in (".csv", ".tsv"))


def _deduplicate(spool: _Spool, progress: Progress) -> Decisions | None:
    if spool.prints is None:
        return None
    dedup = spool.spec.data.dedup
    task = progress.add_task("duplicates", total=len(spool.prints))
    return find_duplicates(spool.prints, spool.kept_in["train"], exact=dedup.exact, near=dedup.near,
                           on_rows=lambda rows: progress.advance(task, rows))


def _fingerprinted(spec: Recipe) -> bool:
    dedup = spec.data.dedup
    return dedup.exact or dedup.near or dedup.containment is not None


def _labels(spool: _Spool) -> np.ndarray:
    return np.frombuffer(spool.label_ids, dtype=np.int32) if len(spool.label_ids) else np.zeros(0, np.int32)


def _held_out(spool: _Spool, kept: np.ndarray, eval_file: bool) -> np.ndarray:
    """Which rows are eval rows: those of the eval file, or the kept rows the split holds out."""
    n, spec = len(spool.offsets), spool.spec
    is_eval = np.zeros(n, dtype=bool)
    if eval_file:
        is_eval[spool.kept_in["train"]:] = True
    else:
        is_eval[kept] = _split(spec, np.flatnonzero(kept), _labels(spool), np.frombuffer(spool.split_values) if
                               len(spool.split_values) else None)
    return is_eval


def _contained(spool: _Spool, train: np.ndarray, evaluation: np.ndarray, progress: Progress) -> np.ndarray:
    """Per row, the training row an eval row overlaps (-1: none)."""
    threshold = spool.spec.data.dedup.containment
    if threshold is None or not evaluation.any() or not train.any():
        return np.full(len(train), -1, dtype=np.int64)
    # Two passes over the rows, one per direction (eval row the shorter, training row the shorter).
    task = progress.add_task("eval rows overlapping training rows", total=2 * len(spool.prints))
    return find_contained(spool.prints, train, evaluation, threshold=threshold,
                          on_rows=lambda rows: progress.advance(task, rows))


def _write(spool: _Spool, decisions: Any, kept: np.ndarray, is_eval: np.ndarray, overlaps: np.ndarray,
           sources: dict[str, Path], directory: Path, require_rows: bool) -> tuple[dict[str, Any], list[Path]]:
    spec, d = spool.spec, spool.spec.data
    n, n_train = len(spool.offsets), spool.kept_in["train"]
    labels = _labels(spool)
    split_note = "eval file" if "eval" in sources else d.split.by
    leaked = overlaps >= 0
    unseen = np.zeros(n, dtype=bool)
    if spec.task == "classification":
        seen = np.unique(labels[kept & ~is_eval])
        unseen = kept & is_eval & ~leaked & ~np.isin(labels, seen)
        if unseen.any() and d.on_bad_rows == "error":
            first = [spool.example(row) for row in np.flatnonzero(unseen)[:3].tolist()]
            places = ", ".join(f"{e.where} ({e.label!r})" for e in first)
            raise DataError(f"{int(unseen.sum())} eval rows have labels that never occur in training: {places}",
                            hint="add training rows for those labels, remove them from the eval file, "
                                 "or set data.on_bad_rows: skip")
        if len(seen) < 2 and require_rows:
            names = {i: name for name, i in spool.label_names.items()}
            raise DataError(f"classification needs at least two labels; training has {sorted(names[i] for i in seen)}",
                            where=str(sources["train"]))
    train_rows, eval_rows = kept & ~is_eval, kept & is_eval & ~leaked & ~unseen
    if (not train_rows.any() or not eval_rows.any()) and require_rows:
        raise DataError(f"after the data steps {int(train_rows.sum())} training and {int(eval_rows.sum())} eval rows "
                        "are left", where=str(sources["train"]),
                        hint="add rows, give an eval file (data.eval), or look at `domaintune data inspect` "
                             "for what was dropped" + overlap_hint(bool(leaked.any()) and not eval_rows.any()))

    cutoff = _cutoff(spool, train_rows, eval_rows)  # read from the spool, which the writing closes
    data_dir = directory / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = [data_dir / "train.jsonl", data_dir / "eval.jsonl"]
    eval_role = "eval" if "eval" in sources else "train"
    with open(files[0], "wb") as train_out, open(files[1], "wb") as eval_out:
        for row, line in enumerate(spool.lines()):
            if train_rows[row]:
                train_out.write(line)
            elif eval_rows[row]:
                eval_out.write(line)
            elif leaked[row]:
                spool.drop(_overlap(spool, row, int(overlaps[row]), line, eval_role))
            elif unseen[row]:
                example = spool.example(row)
                spool.drop(Dropped(eval_role, "labels", example.where, f"label {example.label!r} never occurs in "
                                   "training", _row_fields(line)))
            else:
                spool.drop(_duplicate(spool, decisions, row, line, n_train))
    spool.close()
    if d.on_bad_rows == "quarantine":
        files.append(data_dir / "quarantine.jsonl")
        shutil.move(spool.quarantine, files[-1])

    names = {i: name for name, i in spool.label_names.items()}
    chars, words = np.frombuffer(spool.chars, dtype=np.int32), np.frombuffer(spool.words, dtype=np.int32)

    def summary(mask: np.ndarray) -> SideSummary:
        counts = np.bincount(labels[mask], minlength=len(names)) if spec.task == "classification" else []
        return SideSummary(int(mask.sum()), {names[i]: int(c) for i, c in enumerate(counts) if c},
                           chars[mask] if n else chars, words[mask] if n else words)

    card = card_from_tallies(
        spec=spec, sources={role: (path, spool.rows_in[role]) for role, path in sources.items()},
        train=summary(train_rows), evaluation=summary(eval_rows), dropped=spool.dropped, pii_counts=dict(spool.pii),
        rows_with_pii=spool.rows_with_pii, cleaned_rows=spool.cleaned_rows, split=split_note, cutoff=cutoff)
    card["processed"] = [{"file": str(p.relative_to(directory)), "sha256": sha256_file(p)} for p in files]
    write_card(card, directory)
    return card, files


def _split(spec: Recipe, rows: np.ndarray, labels: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Which of the kept training ``rows`` are held out for evaluation."""
    s = spec.data.split
    seed = s.seed if s.seed is not None else spec.training.seed
    if s.by == "group":
        return group_mask(values[rows], s.eval_fraction, seed)
    if s.by == "time":
        return time_mask(values[rows], s.eval_fraction)
    return holdout_mask(len(rows), s.eval_fraction, seed, labels[rows] if spec.task == "classification" else None)


def _cutoff(spool: _Spool, train_rows: np.ndarray, eval_rows: np.ndarray) -> dict[str, Any]:
    """The card's cut-off of a time split (nothing for another split)."""
    name = split_field(spool.spec)
    if spool.spec.data.split.by != "time" or name is None or not train_rows.any() or not eval_rows.any():
        return {}
    times = np.frombuffer(spool.split_values)
    latest = int(np.flatnonzero(train_rows)[np.argmax(times[train_rows])])
    earliest = int(np.flatnonzero(eval_rows)[np.argmin(times[eval_rows])])
    return time_cutoff(name, spool.example(latest), spool.example(earliest))


def _duplicate(spool: _Spool, decisions: Any, row: int, line: bytes, n_train: int) -> Dropped:
    first = int(decisions.duplicate_of[row])
    kind = "near" if decisions.near[row] else "exact"
    own, kept = json.loads(line), json.loads(spool.line(first))
    if first < n_train <= row:
        return Dropped("eval", "leakage", own["where"], f"{kind} duplicate of training row {kept['where']}",
                       _row_fields(line))
    return duplicate_dropped("train" if row < n_train else "eval", own["where"], kind, kept["where"],
                             (kept.get("label"), own.get("label")), _row_fields(line))


def _overlap(spool: _Spool, row: int, partner: int, line: bytes, role: str) -> Dropped:
    sizes = spool.prints.sizes_of(np.array([row, partner]))
    target = json.loads(spool.line(partner))["where"]
    reason = containment_reason(containment_kind(sizes[0], sizes[1]), target, containment_of(spool.prints, row, partner))
    return Dropped(role, "leakage", json.loads(line)["where"], reason, _row_fields(line))


def _row_fields(line: bytes) -> dict[str, Any]:
    fields = json.loads(line)
    fields.pop("where", None)
    return fields


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("data: {task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=console.quiet)


class _WrittenRows(Sequence):
    """The rows of a written JSONL file, read when iterated (the file may be larger than memory)."""

    def __init__(self, path: Path, count: int):
        self.path, self._count = path, count

    def _decode(self, item: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                yield self._decode(json.loads(line))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(islice(self, *index.indices(self._count)))
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return next(islice(self, index % self._count, None))


class WrittenExamples(_WrittenRows):
    """The examples of a written ``data/train.jsonl`` or ``data/eval.jsonl``."""

    def __init__(self, path: Path, task: str, count: int):
        super().__init__(path, count)
        self.task = task

    def _decode(self, item: dict[str, Any]) -> Example:
        return from_fields(item, self.task)


class WrittenDropped(_WrittenRows):
    """The dropped rows of a written ``data/quarantine.jsonl``."""

    def _decode(self, item: dict[str, Any]) -> Dropped:
        return Dropped(item["source"], item["step"], item["where"], item["reason"], item["row"])


def as_sequences(directory: Path, card: dict[str, Any], task: str,
                 quarantine: bool) -> tuple[Sequence[Example], Sequence[Example], Sequence[Dropped]]:
    """Read-only views of what ``prepare_streaming`` wrote: train, eval and the dropped rows
    (empty unless quarantined)."""
    data = directory / "data"
    dropped: Sequence[Dropped] = WrittenDropped(data / "quarantine.jsonl", card["dropped_total"]) if quarantine else []
    return (WrittenExamples(data / "train.jsonl", task, card["kept"]["train"]),
            WrittenExamples(data / "eval.jsonl", task, card["kept"]["eval"]), dropped)
