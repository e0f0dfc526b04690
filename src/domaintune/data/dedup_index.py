"""Deduplication for data too large for :class:`~domaintune.data.dedup.NearDuplicateIndex`: the
same keep-first decisions from a few numbers per row, made one block of rows at a time.

Per row, on disk (:class:`FingerprintStore`): an 8-byte exact key (:func:`exact_hash`), its
number of distinct shingles (4 bytes), one 4-byte hash per LSH band of the row's MinHash signature
(the permutations and banding of the in-memory index), and its shingle set (4 bytes a shingle).
:func:`find_duplicates` reads them back one block of rows at a time and decides each row in
order, as ``deduplicate`` does: within train the first occurrence stays; an eval row duplicating a
kept training row is a leak, one duplicating an earlier kept eval row an eval duplicate; exact
before near; a near match names the most similar kept row (ties: the earliest).

A row's near candidates are the kept rows in its buckets (the rows with its hash in some band):
those of earlier blocks come from an index that holds, per band and bucket, the bucket's first
``MAX_BUCKET_HEADS`` kept rows; those of its own block from a table filled as the block is
decided. Each candidate is confirmed on the exact Jaccard of the two shingle sets, read back from
the store (all of a row's candidates in one numpy pass), unless the two shingle counts alone rule
the pair out (:func:`_may_reach`). No list of candidate pairs is ever built, and the decisions do
not depend on the block size.

Where the results can differ from ``deduplicate``:

* No MinHash-estimate filter before the exact check, so a pair whose estimate falls three
  standard errors below the threshold while its exact Jaccard is at or above it is found here
  and skipped there: recall is the same or higher, and a reported pair is always above the
  threshold.
* A bucket offers a row only its first ``MAX_BUCKET_HEADS`` kept rows, which bounds memory and
  exact checks on templated data; later rows are matched to the rows kept first, so this rarely
  loses a pair.
* Exact keys are 64 bits: two different texts share one with probability about n² / 2⁶⁵ (one in
  two million at four million rows). Band hashes are 32 bits: two buckets that share one only
  cost exact checks of false candidates (and share one bucket's room).

Memory while deciding: 17 bytes per row (the decisions, and where each shingle set lies in the
store), 12 per distinct text
(the first row of each exact key), at most 8 per band for each kept row with shingles (the
bucket index: 112 bytes at the default threshold's 14 bands), and some 21 bytes per row and band
of one block. Rows are numbered in 32 bits in the indexes, which caps a store at ``MAX_ROWS``
rows.

Leakage by containment (``dedup.find_contained``, after the split) runs the search of
``dedup.contained_leaks`` on the same store: it needs only the shingle counts and sets, read back by
ranges of rows (:meth:`FingerprintStore.sets_of`) and, for the rows to confirm, one row at a time.
Its memory: 21 bytes per row, at most 128 per indexed row (8 sketch shingles: 4 bytes a row
number, 12 a distinct hash) for the eval rows and then for 4 blocks of training rows, and some 100 MB of fixed
tables and block arrays (see ``find_contained``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from domaintune.data.dedup import CONTAINMENT, MIN_CONTAINED_SHINGLES, NUM_PERM, SEED, DedupResult, band_hashes, \
    exact_key, leaks_after, lsh_shape, rank_in_runs, shingles_and_minhash

MAX_BUCKET_HEADS = 16
BLOCK_ROWS = 1 << 16  # rows decided together: large enough to amortise the numpy work per block
MAX_ROWS = 2**32 - 1


def exact_hash(text: str) -> int:
    """A 64-bit exact key: equal for texts equal after ``normalize_for_hash``."""
    return int(exact_key(text)[:16], 16)


@dataclass
class Fingerprints:
    """What the index keeps of a batch of texts."""

    exact: np.ndarray  # (n,) uint64 exact keys
    bands: np.ndarray  # (n, bands) uint32 band hashes; zeros for texts without shingles
    sizes: np.ndarray  # (n,) uint32 distinct shingles per text
    sets: list[np.ndarray] | None = None  # the shingle sets (:func:`~domaintune.data.dedup.shingles`), when held

    @property
    def shingled(self) -> np.ndarray:
        """(n,) bool: the text has shingles (empty ones are never near duplicates)."""
        return self.sizes > 0

    def __len__(self) -> int:
        return len(self.exact)


def fingerprint(texts: Sequence[str], threshold: float) -> Fingerprints:
    """Exact keys, LSH band hashes (for a near-duplicate ``threshold``), shingle counts and
    shingle sets of ``texts``."""
    bands, rows = lsh_shape(threshold)
    sets = []
    matrix = np.zeros((len(texts), bands * rows), dtype=np.uint64)
    for i, text in enumerate(texts):
        # What ``signature`` is made of, shingle set included: the text is shingled once for both.
        found, minhash = shingles_and_minhash(text, NUM_PERM, SEED)
        sets.append(found.astype(np.uint32))
        matrix[i] = minhash.hashvalues[: bands * rows]
    sizes = np.array([s.size for s in sets], dtype=np.uint32)
    hashes = band_hashes(matrix.reshape(len(texts), bands, rows))
    hashes[sizes == 0] = 0
    return Fingerprints(np.array([exact_hash(t) for t in texts], dtype=np.uint64), hashes, sizes, sets)


class FingerprintStore:
    """The fingerprints of every row so far, in row order, appended to four files under
    ``directory`` (exact keys, shingle counts, band hashes, shingle sets) and read back by blocks
    of rows, and the shingle sets one row or one range of rows at a time."""

    _DTYPES = {"exact": np.dtype(np.uint64), "sizes": np.dtype(np.uint32), "bands": np.dtype(np.uint32)}

    def __init__(self, directory: Path, threshold: float):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threshold = threshold
        self.bands, _ = lsh_shape(threshold)
        self._rows = 0
        self._files = {name: open(self._path(name), "wb") for name in [*self._DTYPES, "sets"]}
        self._starts: np.ndarray | None = None  # where each row's set begins in sets.bin, in shingles
        self._sets: int | None = None  # sets.bin opened for reading

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.bin"

    def __len__(self) -> int:
        return self._rows

    def append(self, prints: Fingerprints) -> None:
        if self._rows + len(prints) > MAX_ROWS:
            raise ValueError(f"a fingerprint store holds at most {MAX_ROWS} rows")
        if prints.sets is None:
            raise ValueError("appended fingerprints must hold their shingle sets")
        for name in self._DTYPES:
            self._files[name].write(np.ascontiguousarray(getattr(prints, name), dtype=self._DTYPES[name]).tobytes())
        for found in prints.sets:
            self._files["sets"].write(np.ascontiguousarray(found, dtype=np.uint32).tobytes())
        self._rows += len(prints)

    def close(self) -> None:
        """Flush the files; call before reading."""
        for fh in self._files.values():
            fh.close()
        sizes = np.fromfile(self._path("sizes"), dtype=np.uint32)
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.uint64)])
        self._sets = os.open(self._path("sets"), os.O_RDONLY)

    def release(self) -> None:
        """Close the file the shingle sets are read from."""
        if self._sets is not None:
            os.close(self._sets)
            self._sets = None

    def shingle_counts(self) -> np.ndarray:
        """Every row's shingle count, as uint32."""
        return np.diff(self._starts).astype(np.uint32)

    def sizes_of(self, rows: np.ndarray) -> np.ndarray:
        """The shingle counts of ``rows``."""
        return (self._starts[rows + 1] - self._starts[rows]).astype(np.int64)

    def shingles_of(self, row: int) -> np.ndarray:
        """Row ``row``'s shingle set, as :func:`~domaintune.data.dedup.shingles` gave it."""
        start, stop = int(self._starts[row]), int(self._starts[row + 1])
        # pread, not a memory map: the pages stay in the page cache, not in this process's RSS.
        return np.frombuffer(os.pread(self._sets, 4 * (stop - start), 4 * start), dtype=np.uint32)

    def sets_of(self, start: int, stop: int) -> np.ndarray:
        """The shingle sets of rows ``start .. stop-1``, one after the other (one read)."""
        first, last = int(self._starts[start]), int(self._starts[stop])
        return np.frombuffer(os.pread(self._sets, 4 * (last - first), 4 * first), dtype=np.uint32)

    def block(self, start: int, stop: int) -> Fingerprints:
        """The fingerprints of rows ``start .. stop-1``."""
        count = stop - start

        def read(name: str, width: int) -> np.ndarray:
            dtype = self._DTYPES[name]
            return np.fromfile(self._path(name), dtype=dtype, count=count * width,
                               offset=start * width * dtype.itemsize)

        return Fingerprints(read("exact", 1), read("bands", self.bands).reshape(count, self.bands), read("sizes", 1))


@dataclass
class Decisions:
    """Per row: the kept row it duplicates (-1: kept) and whether the match is near (else exact)."""

    duplicate_of: np.ndarray  # int64
    near: np.ndarray  # bool

    @property
    def kept(self) -> np.ndarray:
        return self.duplicate_of < 0


def find_duplicates(store: FingerprintStore, n_train: int, *, exact: bool = True, near: bool = True,
                    block_rows: int = BLOCK_ROWS, on_rows: Callable[[int], None] | None = None) -> Decisions:
    """Decide every row of ``store`` (closed): rows ``0 .. n_train-1`` are training rows, the rest
    eval rows. Rows are read and decided ``block_rows`` at a time, ``on_rows(k)`` told after each
    block of ``k`` rows; the decisions are the same for any block size."""
    n = len(store)
    decider = _Decider(n, n_train, store, exact=exact, near=near)
    if exact or near:
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            decider.decide(start, store.block(start, stop))
            if on_rows:
                on_rows(stop - start)
    return decider.decisions


class _FirstRows:
    """The first row of every exact key seen so far, as sorted keys and their rows."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.uint64)
        self._rows = np.zeros(0, np.uint32)

    def first(self, keys: np.ndarray, start: int) -> np.ndarray:
        """For the rows ``start, start + 1, ...`` with ``keys``: the first row with the same key.
        Remembers the keys not seen before."""
        distinct, index, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first = start + index.astype(np.int64)
        at = np.searchsorted(self._keys, distinct)
        seen = at < len(self._keys)
        seen[seen] = self._keys[at[seen]] == distinct[seen]
        first[seen] = self._rows[at[seen]]
        new = ~seen
        self._keys = np.insert(self._keys, at[new], distinct[new])
        self._rows = np.insert(self._rows, at[new], first[new].astype(np.uint32))
        return first[inverse.reshape(-1)]


class _Buckets:
    """Per band, the first ``MAX_BUCKET_HEADS`` kept rows of each bucket, as band hashes sorted
    with their rows in row order."""

    def __init__(self, bands: int):
        self._hashes = [np.zeros(0, np.uint32) for _ in range(bands)]
        self._rows = [np.zeros(0, np.uint32) for _ in range(bands)]

    def spans(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row and band of ``hashes`` (rows × bands): where its bucket's rows lie in
        that band, ``lo`` to ``hi``."""
        lo, hi = np.empty(hashes.shape, np.int64), np.empty(hashes.shape, np.int64)
        for band, known in enumerate(self._hashes):
            lo[:, band] = np.searchsorted(known, hashes[:, band], "left")
            hi[:, band] = np.searchsorted(known, hashes[:, band], "right")
        return lo, hi

    def rows(self, band: int, lo: int, hi: int) -> list[int]:
        return self._rows[band][lo:hi].tolist()

    def add(self, rows: np.ndarray, hashes: np.ndarray) -> None:
        """File kept ``rows`` (ascending, after every row filed so far) in the buckets of their
        ``hashes`` that have room."""
        for band, known in enumerate(self._hashes):
            order = np.argsort(hashes[:, band], kind="stable")
            values = hashes[order, band]
            room = MAX_BUCKET_HEADS - (np.searchsorted(known, values, "right") - np.searchsorted(known, values, "left"))
            take = rank_in_runs(values) < room
            at = np.searchsorted(known, values[take], "right")
            self._hashes[band] = np.insert(known, at, values[take])
            self._rows[band] = np.insert(self._rows[band], at, rows[order][take].astype(np.uint32))


def _shared(hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(rows × bands) whether the row is among ``rows`` and shares that band's hash with another
    of them."""
    shared = np.zeros(hashes.shape, dtype=bool)
    for band in range(hashes.shape[1]):
        order = np.argsort(hashes[rows, band], kind="stable")
        values = hashes[rows[order], band]
        equal = values[1:] == values[:-1]
        hit = np.zeros(len(values), dtype=bool)
        hit[1:] |= equal
        hit[:-1] |= equal
        shared[rows[order], band] = hit
    return shared


class _Decider:
    """What deciding a block needs of the blocks before it, and the decisions so far."""

    def __init__(self, n: int, n_train: int, store: FingerprintStore, *, exact: bool, near: bool):
        self.decisions = Decisions(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool))
        self.n_train, self.threshold, self.exact = n_train, store.threshold, exact
        self._store = store
        self._first_rows = _FirstRows()
        self._buckets = _Buckets(store.bands) if near else None

    def decide(self, start: int, prints: Fingerprints) -> None:
        """Decide rows ``start .. start + len(prints) - 1``, every row before them decided."""
        dup, is_near = self.decisions.duplicate_of, self.decisions.near
        first = self._first_rows.first(prints.exact, start)
        rows = np.arange(start, start + len(prints))
        repeat = first != rows
        if self._buckets is None:  # exact only: every repeat duplicates the (kept) first of its key
            dup[rows[repeat]] = first[repeat]
            return
        lo, hi = self._buckets.spans(prints.bands)
        # Repeats take part: a repeat of a row dropped in an earlier block searches its buckets.
        shared = _shared(prints.bands, np.flatnonzero(prints.shingled))
        # Rows with no earlier kept row in any bucket and no exact repeat are kept without a look.
        busy = repeat | shared.any(axis=1) | ((hi > lo).any(axis=1) & prints.shingled)
        recent: list[dict[int, list[int]]] = [{} for _ in range(prints.bands.shape[1])]  # this block's kept rows
        for i in np.flatnonzero(busy).tolist():
            row, head = start + i, int(first[i])
            if head != row and (dup[head] < 0 or not prints.shingled[i]):  # a repeat of a kept row or of an empty text
                if self.exact or prints.shingled[i]:
                    dup[row], is_near[row] = head, not self.exact
                continue
            # A new text, or a repeat of a dropped one (whose buckets it shares).
            hashes, lo_i, hi_i = prints.bands[i].tolist(), lo[i].tolist(), hi[i].tolist()
            candidates: set[int] = set()
            for band, value in enumerate(hashes):
                candidates.update(self._buckets.rows(band, lo_i[band], hi_i[band]))
                candidates.update(recent[band].get(value, ()))
            match = self._match(row, sorted(candidates))
            if match is not None:
                dup[row], is_near[row] = match, True
                continue
            for band in np.flatnonzero(shared[i]).tolist():
                bucket = recent[band].setdefault(hashes[band], [])
                if hi_i[band] - lo_i[band] + len(bucket) < MAX_BUCKET_HEADS:
                    bucket.append(row)
        kept = (dup[start : start + len(prints)] < 0) & prints.shingled
        self._buckets.add(rows[kept], prints.bands[kept])

    def _match(self, row: int, candidates: list[int]) -> int | None:
        if row < self.n_train:
            return self._most_similar(row, candidates)
        # Training rows first: a leak is reported as a leak.
        match = self._most_similar(row, [c for c in candidates if c < self.n_train])
        return match if match is not None else self._most_similar(row, [c for c in candidates if c >= self.n_train])

    def _most_similar(self, row: int, candidates: list[int]) -> int | None:
        if not candidates:
            return None
        found = np.array(candidates, dtype=np.int64)
        sizes = self._store.sizes_of(found)
        size = int(self._store.sizes_of(np.array([row]))[0])
        reach = _may_reach(size, sizes, self.threshold)
        if not reach.any():  # nothing to read, not even this row's set
            return None
        found, sizes = found[reach], sizes[reach]
        mine = self._store.shingles_of(row)
        # One pass over every candidate's set: which of its shingles this row has, summed per set.
        theirs = np.concatenate([self._store.shingles_of(c) for c in found.tolist()])
        at = np.minimum(np.searchsorted(mine, theirs), len(mine) - 1)
        common = np.add.reduceat(mine[at] == theirs, np.r_[0, np.cumsum(sizes)[:-1]]).astype(np.int64)
        # The division :func:`jaccard` makes, in the same float64 rounding.
        similarity = common / (size + sizes - common)
        best = int(np.argmax(similarity))  # candidates ascend: the earliest wins a tie
        return int(found[best]) if similarity[best] >= self.threshold else None


def _may_reach(size: int, sizes: np.ndarray, threshold: float) -> np.ndarray:
    """Whether a shingle set of ``size`` and sets of ``sizes`` can have a Jaccard similarity of
    ``threshold`` or more, per element of ``sizes``.

    |A ∩ B| <= min(|A|, |B|) and |A ∪ B| >= max(|A|, |B|), so Jaccard(A, B) <= min / max: a pair
    whose counts differ more than that never reaches the threshold, and skipping it changes no
    decision. The float test agrees with :func:`jaccard`'s: both are one correctly rounded
    division of integers, and rounding keeps their order (equal when one set holds the other).
    """
    small, large = np.minimum(size, sizes), np.maximum(size, sizes)
    return (large > 0) & (small / np.maximum(large, 1) >= threshold)


def contained_leaks_compact(train: Sequence[str], eval: Sequence[str], *, threshold: float = CONTAINMENT,
                            min_shingles: int = MIN_CONTAINED_SHINGLES,
                            block_rows: int = BLOCK_ROWS) -> dict[int, tuple[int, str, float]]:
    """``contained_leaks`` computed with the compact index (fingerprint files in a temporary
    directory), ``block_rows`` rows at a time."""
    texts = [*train, *eval]
    with tempfile.TemporaryDirectory(prefix="contain-") as directory:
        store = FingerprintStore(Path(directory), 0.85)
        store.append(fingerprint(texts, 0.85))
        store.close()
        try:
            return leaks_after(store, len(train), threshold=threshold, min_shingles=min_shingles,
                               block_rows=block_rows)
        finally:
            store.release()


def deduplicate_compact(train: Sequence[str], eval: Sequence[str] = (), *, exact: bool = True, near: bool = True,
                        threshold: float = 0.85, block_rows: int = BLOCK_ROWS) -> DedupResult:
    """``deduplicate`` computed with the compact index (fingerprint files in a temporary
    directory), ``block_rows`` rows at a time."""
    texts = [*train, *eval]
    with tempfile.TemporaryDirectory(prefix="dedup-") as directory:
        store = FingerprintStore(Path(directory), threshold)
        store.append(fingerprint(texts, threshold))
        store.close()
        try:
            decisions = find_duplicates(store, len(train), exact=exact, near=near, block_rows=block_rows)
        finally:
            store.release()
    result = DedupResult([True] * len(train), {}, [True] * len(eval), {}, {})
    for row in np.flatnonzero(~decisions.kept).tolist():
        match = (int(decisions.duplicate_of[row]), "near" if decisions.near[row] else "exact")
        if row < len(train):
            result.train_keep[row] = False
            result.train_duplicate_of[row] = match
        else:
            result.eval_keep[row - len(train)] = False
            target = result.eval_leaks if match[0] < len(train) else result.eval_duplicate_of
            target[row - len(train)] = match if match[0] < len(train) else (match[0] - len(train), match[1])
    return result
