"""Deduplication for data too large for :class:`~domaintune.data.dedup.NearDuplicateIndex`: the
same keep-first decisions from a few numbers per row.

Per row: an 8-byte exact key (:func:`exact_hash`) and a flag in memory, and one 8-byte hash per
LSH band of the row's MinHash signature (the permutations and banding of the in-memory index) in
one file per band on disk. Candidate pairs are rows that share a band hash, found one band at a
time by sorting that band's column; only the first row of each exact key takes part, since its
repeats are settled by the key. Each candidate is confirmed on the exact Jaccard of the two
texts, read back through ``text_of``. Rows are then decided in order as ``deduplicate`` does:
within train the first occurrence stays; an eval row duplicating a kept training row is a leak,
one duplicating an earlier kept eval row an eval duplicate; exact before near; a near match names
the most similar kept row (ties: the earliest).

Where the results can differ from ``deduplicate``:

* No MinHash-estimate filter before the exact check, so a pair whose estimate falls three
  standard errors below the threshold while its exact Jaccard is at or above it is found here
  and skipped there: recall is the same or higher, and a reported pair is always above the
  threshold.
* A band bucket of more than ``MAX_BUCKET_HEADS`` rows pairs each of its rows only with the first
  ``MAX_BUCKET_HEADS`` of them, which bounds the pairs held in memory on templated data; the rows
  kept first are the ones later rows are matched to, so this rarely loses a pair.
* Exact keys are 64 bits: two different texts share one with probability about n² / 2⁶⁵ (one in
  two million at four million rows).

Memory: about 10 bytes a row while rows arrive, 40 a row while deciding, plus 32 bytes per
candidate pair; the band columns are read one at a time.
"""

from __future__ import annotations

import tempfile
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from domaintune.data.dedup import DedupResult, exact_key, jaccard, lsh_shape, shingles, signature

MAX_BUCKET_HEADS = 16
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def exact_hash(text: str) -> int:
    """A 64-bit exact key: equal for texts equal after ``normalize_for_hash``."""
    return int(exact_key(text)[:16], 16)


@dataclass
class Fingerprints:
    """What the index keeps of a batch of texts."""

    exact: np.ndarray  # (n,) uint64 exact keys
    bands: np.ndarray  # (n, bands) uint64 band hashes; zeros for texts without shingles
    shingled: np.ndarray  # (n,) bool: the text has shingles (empty ones are never near duplicates)


def fingerprint(texts: Sequence[str], threshold: float) -> Fingerprints:
    """Exact keys and LSH band hashes of ``texts`` for a near-duplicate ``threshold``."""
    bands, rows = lsh_shape(threshold)
    signatures = [signature(text) for text in texts]
    shingled = np.array([s is not None for s in signatures], dtype=bool)
    matrix = np.zeros((len(texts), bands * rows), dtype=np.uint64)
    for i, values in enumerate(signatures):
        if values is not None:
            matrix[i] = values[: bands * rows]
    hashes = _band_hashes(matrix.reshape(len(texts), bands, rows))
    hashes[~shingled] = 0
    return Fingerprints(np.array([exact_hash(t) for t in texts], dtype=np.uint64), hashes, shingled)


def _band_hashes(parts: np.ndarray) -> np.ndarray:
    # FNV-1a over the band's 32-bit MinHash values, then a 64-bit finalizer: equal bands give
    # equal hashes; a collision only costs an exact check of a false candidate.
    h = np.full(parts.shape[:2], _FNV_OFFSET)
    for column in range(parts.shape[2]):
        h = (h ^ parts[:, :, column]) * _FNV_PRIME
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return h ^ (h >> np.uint64(29))


class FingerprintStore:
    """The fingerprints of every row so far, in row order: exact keys and flags in memory, band
    hashes appended to one file per band under ``directory``."""

    def __init__(self, directory: Path, threshold: float):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threshold = threshold
        self.bands, _ = lsh_shape(threshold)
        self._exact = array("Q")
        self._shingled = array("b")
        self._files = [open(self._band_path(k), "wb") for k in range(self.bands)]

    def _band_path(self, band: int) -> Path:
        return self.directory / f"band-{band:03d}.u64"

    def __len__(self) -> int:
        return len(self._exact)

    def append(self, prints: Fingerprints) -> None:
        self._exact.frombytes(prints.exact.astype(np.uint64).tobytes())
        self._shingled.frombytes(prints.shingled.astype(np.int8).tobytes())
        for band, fh in enumerate(self._files):
            fh.write(np.ascontiguousarray(prints.bands[:, band]).tobytes())

    def close(self) -> None:
        """Flush the band files; call before reading bands."""
        for fh in self._files:
            fh.close()

    def exact(self) -> np.ndarray:
        return np.frombuffer(self._exact, dtype=np.uint64) if len(self) else np.zeros(0, np.uint64)

    def shingled(self) -> np.ndarray:
        return np.frombuffer(self._shingled, dtype=np.int8).astype(bool) if len(self) else np.zeros(0, bool)

    def band(self, band: int) -> np.ndarray:
        return np.fromfile(self._band_path(band), dtype=np.uint64)


@dataclass
class Decisions:
    """Per row: the kept row it duplicates (-1: kept) and whether the match is near (else exact)."""

    duplicate_of: np.ndarray  # int64
    near: np.ndarray  # bool

    @property
    def kept(self) -> np.ndarray:
        return self.duplicate_of < 0


def find_duplicates(store: FingerprintStore, n_train: int, text_of: Callable[[int], str], *, exact: bool = True,
                    near: bool = True, on_band: Callable[[int], None] | None = None) -> Decisions:
    """Decide every row of ``store``: rows ``0 .. n_train-1`` are training rows, the rest eval
    rows. ``text_of(i)`` gives row ``i``'s text (to confirm near candidates); ``on_band(k)`` is
    told when band ``k`` has been searched."""
    n = len(store)
    decisions = Decisions(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool))
    if n == 0 or not (exact or near):
        return decisions
    first = _first_of_key(store.exact())
    shingled = store.shingled()
    pairs = _candidate_pairs(store, np.flatnonzero((first == np.arange(n)) & shingled), on_band) if near \
        else np.zeros(0, np.int64)
    later, earlier = pairs // n, pairs % n
    del pairs
    by_earlier = np.argsort(earlier, kind="stable")
    earlier_sorted = earlier[by_earlier]
    own = lru_cache(maxsize=1 << 12)(lambda row: shingles(text_of(row)))
    kept = np.ones(n, dtype=bool)
    dup, is_near = decisions.duplicate_of, decisions.near

    def partners(head: int, before: int) -> np.ndarray:
        """Kept rows before ``before`` sharing a band with ``head``, ascending."""
        lo, hi = np.searchsorted(later, [head, head + 1])
        e_lo, e_hi = np.searchsorted(earlier_sorted, [head, head + 1])
        found = np.union1d(earlier[lo:hi], later[by_earlier[e_lo:e_hi]])
        found = found[found < before]
        return found[kept[found]]

    for row in np.union1d(np.flatnonzero(first != np.arange(n)), later).tolist():
        head = int(first[row])
        if head != row and (kept[head] or not shingled[row]):  # a repeat of a kept row, or of an empty text
            if exact or shingled[row]:
                dup[row], is_near[row], kept[row] = head, not exact, False
            continue
        # A new text, or a repeat of a dropped one: its candidates are those of the first of its key.
        candidates = partners(head, row)
        if row >= n_train:  # training rows first: a leak is reported as a leak
            match = _most_similar(row, candidates[candidates < n_train], own, store.threshold)
            if match is None:
                match = _most_similar(row, candidates[candidates >= n_train], own, store.threshold)
        else:
            match = _most_similar(row, candidates, own, store.threshold)
        if match is not None:
            dup[row], is_near[row], kept[row] = match, True, False
    return decisions


def _first_of_key(keys: np.ndarray) -> np.ndarray:
    """For each row, the first row with the same key."""
    order = np.argsort(keys, kind="stable")  # stable: equal keys stay in row order
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = keys[order][1:] != keys[order][:-1]
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    return first


def _candidate_pairs(store: FingerprintStore, rows: np.ndarray, on_band: Callable[[int], None] | None) -> np.ndarray:
    """Sorted distinct ``later * n + earlier`` codes of rows sharing a band hash."""
    n = len(store)
    pairs = np.zeros(0, dtype=np.int64)
    for band in range(store.bands):
        values = store.band(band)[rows]
        order = np.argsort(values, kind="stable")
        found = _pairs_in_runs(values[order], rows[order])
        pairs = np.union1d(pairs, found[0] * n + found[1])
        if on_band:
            on_band(band)
    return pairs


def _pairs_in_runs(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(later, earlier) rows within each run of equal sorted ``values``; rows ascend in a run."""
    if len(values) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    position = np.arange(len(values)) - np.repeat(starts, lengths)  # place within the run
    room = np.repeat(lengths, lengths) - position - 1  # rows after it in the run
    active = np.flatnonzero((position < MAX_BUCKET_HEADS) & (room > 0))
    later, earlier = [], []
    # Offset by offset: a head p of a run pairs with p + d; heads with no row d places on drop out.
    d = 1
    while active.size:
        later.append(rows[active + d])
        earlier.append(rows[active])
        d += 1
        active = active[room[active] >= d]
    if not later:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(later).astype(np.int64), np.concatenate(earlier).astype(np.int64)


def _most_similar(row: int, candidates: np.ndarray, own: Callable[[int], np.ndarray], threshold: float) -> int | None:
    best, best_similarity = None, -1.0
    mine = own(row)
    for candidate in candidates.tolist():  # ascending: the earliest wins a tie
        similarity = jaccard(mine, own(candidate))
        if similarity >= threshold and similarity > best_similarity:
            best, best_similarity = candidate, similarity
    return best


def deduplicate_compact(train: Sequence[str], eval: Sequence[str] = (), *, exact: bool = True, near: bool = True,
                        threshold: float = 0.85) -> DedupResult:
    """``deduplicate`` computed with the compact index (band files in a temporary directory)."""
    texts = [*train, *eval]
    with tempfile.TemporaryDirectory(prefix="dedup-") as directory:
        store = FingerprintStore(Path(directory), threshold)
        store.append(fingerprint(texts, threshold))
        store.close()
        decisions = find_duplicates(store, len(train), texts.__getitem__, exact=exact, near=near)
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
