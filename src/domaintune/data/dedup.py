"""Find exact and near-duplicate texts, within training data and between training and eval data.

Exact duplicates are texts equal after :func:`normalize_for_hash` (case, Unicode form,
punctuation and whitespace folded). Near duplicates are texts whose sets of character 5-grams
(of the normalized text) have a Jaccard similarity of at least the threshold.

Why character 5-grams: domain rows are often short (support tickets of 8-30 words). Word 3-grams,
the usual choice for web pages, give a 25-word ticket with one word changed a Jaccard of only
about 0.8, since each changed word spoils three shingles out of some twenty. Character 5-grams
give the same pair about 0.89, two changed words about 0.81, and different tickets on the same
topic 0.1-0.3; they also absorb typos and inflections. One shingling for every length keeps the
threshold's meaning the same everywhere, at the price of one shingle per character rather than
per word on long texts.

MinHash LSH (datasketch) finds candidate pairs without comparing every pair; each candidate is
then confirmed on the exact Jaccard of the two shingle sets, so a reported pair is always at or
above the threshold. LSH can miss a pair: with the banding used here (threshold 0.85, 128
permutations) about 3% of pairs right at the threshold and 0.1% of pairs 0.05 above it.

Leakage is also containment (:func:`contained_leaks`): an eval row that is a training row plus a
sentence, or the other way round, has a Jaccard below 0.85 (the 153 tickets of 23-27 words in
recipes/support-intents with a 5-word sentence appended: a median of 0.82), yet the model has seen
the eval row's content. Containment is the share of the shorter text's shingles found in the
longer one's, ``|A ∩ B| / min(|A|, |B|)``; from ``CONTAINMENT`` up, and with the shorter text at
least ``MIN_CONTAINED_SHINGLES`` shingles long, an eval row leaked. The search
(:func:`find_contained`) indexes the eval rows by a second banding of the same MinHash signature,
tuned for the lower Jaccard of a containment pair of different lengths, and looks the training
rows up in it; each candidate is confirmed on the exact containment of the two shingle sets. It
runs in memory (:class:`ShingleTable`) and on the streaming path's fingerprint files alike.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Hashable, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

SHINGLE_CHARS = 5
# LSH banding tuned for recall: false candidates only cost an exact check, missed pairs are lost.
_LSH_WEIGHTS = (0.02, 0.98)
# Closer to 1, 128 permutations leave LSH fewer than two bands; candidates found at 0.99 include
# every pair above it, and the exact check applies the real threshold.
_LSH_MAX_THRESHOLD = 0.99
NUM_PERM = 128
SEED = 1

# Containment from which an eval row leaked. Measured on the 720 support tickets of
# recipes/support-intents (all 258,840 pairs of different tickets, Jaccard < 0.85): with the
# shorter ticket at least MIN_CONTAINED_SHINGLES long, the highest containment is 0.80 (0.65 from
# 40 shingles on), so none reaches 0.9; a ticket with a sentence appended has 1.0, and with a word
# also changed about 0.93. Equal-length texts at 0.9 have a Jaccard of about 0.82.
CONTAINMENT = 0.9
# Below 30 shingles (some 34 characters, 6 words) a whole text inside another is a common phrase
# as often as a leak: the 3 pairs of those tickets at 0.9 or more are "where is my refund" (14
# shingles), "my account is locked" (16) and "how do i change my password" (23) inside longer
# tickets. 9% of the tickets are that short; exact and near duplicates of them are still leaks.
MIN_CONTAINED_SHINGLES = 30
# Containment candidates: 42 bands of 3 signature values, a pair sharing at least 2 of them. A pair
# at containment 0.9 has a Jaccard of 0.9 / (ρ + 0.1) when one text has ρ times the other's
# shingles: it is found with probability 0.997 up to ρ = 1.5, 0.85 at ρ = 2 and 0.28 at ρ = 3
# (at containment 1.0: 1.0, 0.97, 0.46), while no bucket is full (MAX_CONTAINED_HEADS). One shared band would raise the last to 0.65 but make
# unrelated pairs candidates too often: at Jaccard 0.02, 42·0.02³ ≈ 3·10⁻⁴ of them, hundreds per
# query among a million rows; two shared bands, 861·0.02⁶ ≈ 6·10⁻⁸.
CONTAINMENT_BANDS, CONTAINMENT_ROWS = 42, 3
MIN_SHARED_BANDS = 2


class _PunctuationToSpace(dict[int, int]):
    """A ``str.translate`` table mapping every Unicode punctuation character to a space.

    Filled lazily, one code point at a time, instead of scanning all of Unicode up front.
    """

    def __missing__(self, code: int) -> int:
        self[code] = 0x20 if unicodedata.category(chr(code)).startswith("P") else code
        return self[code]


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()


def normalize_for_hash(text: str) -> str:
    """Fold what does not change a text's meaning: Unicode compatibility forms, case,
    punctuation (to spaces) and whitespace (to single spaces, none at the ends)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.translate(_PUNCTUATION_TO_SPACE).split())


# A row is normalized for its exact key and again for its shingles, often back to back.
_normalized = lru_cache(maxsize=4)(normalize_for_hash)


def exact_key(text: str) -> str:
    """A hex digest equal for texts that are equal after :func:`normalize_for_hash`."""
    return hashlib.blake2b(_normalized(text).encode(), digest_size=16).hexdigest()


_ROLLING_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def shingles(text: str) -> np.ndarray:
    """Sorted distinct 32-bit hashes of the character 5-grams of the normalized text; a text
    shorter than that is one shingle, an empty one has none.

    Hashed with numpy (a polynomial hash over code points) because hashing each 5-gram in
    Python would be most of the time spent on short texts.
    """
    codes = np.frombuffer(_normalized(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if codes.size == 0:
        return codes.astype(np.uint32)
    count = max(1, codes.size - SHINGLE_CHARS + 1)
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(min(SHINGLE_CHARS, codes.size)):
        hashes = hashes * _ROLLING_MULTIPLIER + codes[offset : offset + count]
    return np.unique(_mix_to_32_bits(hashes))


def _mix_to_32_bits(hashes: np.ndarray) -> np.ndarray:
    # Polynomial hashes of 5-grams that differ only in their last character differ only in the
    # low bits; MurmurHash3's finalizer spreads every input bit over the 32 bits kept (32 bits
    # is what datasketch's default scheme takes).
    hashes = hashes ^ (hashes >> np.uint64(33))
    hashes = hashes * np.uint64(0xFF51AFD7ED558CCD)
    hashes = hashes ^ (hashes >> np.uint64(33))
    hashes = hashes * np.uint64(0xC4CEB9FE1A85EC53)
    hashes = hashes ^ (hashes >> np.uint64(33))
    return (hashes >> np.uint64(32)).astype(np.uint32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two :func:`shingles` sets."""
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


def containment(a: np.ndarray, b: np.ndarray) -> float:
    """The share of the smaller of two :func:`shingles` sets found in the other (0 when one is empty)."""
    smaller = min(a.size, b.size)
    return np.intersect1d(a, b, assume_unique=True).size / smaller if smaller else 0.0


def _already_hashed(value: int) -> int:
    return value


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def band_hashes(parts: np.ndarray) -> np.ndarray:
    """(rows × bands) 32-bit hashes of MinHash values given as (rows × bands × values per band)."""
    # FNV-1a over the band's 32-bit MinHash values, then a 64-bit finalizer whose high half is
    # kept: equal bands give equal hashes; a collision only costs an exact check.
    h = np.full(parts.shape[:2], _FNV_OFFSET)
    for column in range(parts.shape[2]):
        h = (h ^ parts[:, :, column]) * _FNV_PRIME
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(32)).astype(np.uint32)


@lru_cache(maxsize=8)
def lsh_shape(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) of the LSH banding :class:`NearDuplicateIndex` uses at ``threshold``."""
    lsh = MinHashLSH(threshold=min(threshold, _LSH_MAX_THRESHOLD), num_perm=num_perm, weights=_LSH_WEIGHTS)
    return lsh.b, lsh.r


def signature(text: str, num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray | None:
    """The MinHash signature (``num_perm`` values) of ``text``'s shingles; None when it has none."""
    found, minhash = shingles_and_minhash(text, num_perm, seed)
    return minhash.hashvalues if found.size else None


@lru_cache(maxsize=8)
def _empty_minhash(num_perm: int, seed: int) -> MinHash:
    # Building the permutations is the costly part of a MinHash; every copy shares them.
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=_already_hashed)


@lru_cache(maxsize=4)
def shingles_and_minhash(text: str, num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, MinHash]:
    """``text``'s shingles and their MinHash, from one pass over the text."""
    # Cached because callers query a text and then add it, or query two indexes with it.
    found = shingles(text)
    minhash = _empty_minhash(num_perm, seed).copy()
    minhash.update_batch(found.tolist())
    return found, minhash


@dataclass(frozen=True)
class _Indexed:
    order: int
    text: str  # a reference to the caller's string: shingles are recomputed only to confirm
    signature: np.ndarray


class NearDuplicateIndex:
    """Incremental MinHash LSH over character 5-gram shingles, with exact confirmation.

    Add texts under keys of your choice, query with a text to get the keys of added texts whose
    Jaccard similarity to it is at least ``threshold``. Texts with no shingles (empty after
    normalization) are never near duplicates of anything.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = NUM_PERM, seed: int = SEED):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        lsh_threshold = min(threshold, _LSH_MAX_THRESHOLD)
        self._lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
        # LSH candidates whose MinHash estimate is three standard errors below the threshold are
        # dropped before the exact check: on templated data most candidates are of that kind.
        self._estimate_floor = threshold - 3 * math.sqrt(threshold * (1 - threshold) / num_perm)
        self._entries: dict[Hashable, _Indexed] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def query(self, text: str) -> list[Hashable]:
        """Keys of added texts with Jaccard similarity to ``text`` >= threshold, most similar
        first (ties: earliest added first)."""
        found, minhash = shingles_and_minhash(text, self.num_perm, self.seed)
        if not found.size:
            return []
        scored = []
        for key in self._lsh.query(minhash):
            entry = self._entries[key]
            estimate = np.count_nonzero(entry.signature == minhash.hashvalues) / self.num_perm
            if estimate < self._estimate_floor:
                continue
            similarity = jaccard(found, shingles(entry.text))
            if similarity >= self.threshold:
                scored.append((-similarity, entry.order, key))
        return [key for _, _, key in sorted(scored, key=lambda item: item[:2])]

    def add(self, key: Hashable, text: str) -> None:
        """Index ``text`` under ``key``; a key can be added once."""
        if key in self._entries:
            raise ValueError(f"key {key!r} is already in the index")
        found, minhash = shingles_and_minhash(text, self.num_perm, self.seed)
        self._entries[key] = _Indexed(len(self._entries), text, minhash.hashvalues)
        if found.size:
            self._lsh.insert(key, minhash, check_duplication=False)


@dataclass
class DedupResult:
    """Which rows to keep, and for each dropped row the kept row it duplicates and the kind
    (``"exact"`` or ``"near"``). Indices are positions in the sequences given.

    train_duplicate_of: dropped training row -> earlier kept training row.
    eval_leaks: dropped eval row -> kept training row (the eval row leaked from training).
    eval_duplicate_of: dropped eval row -> earlier kept eval row; leaks are not repeated here.

    Kept plus dropped is the total: ``sum(train_keep) + len(train_duplicate_of) == len(train)``
    and ``sum(eval_keep) + len(eval_leaks) + len(eval_duplicate_of) == len(eval)``.
    """

    train_keep: list[bool]
    train_duplicate_of: dict[int, tuple[int, str]]
    eval_keep: list[bool]
    eval_leaks: dict[int, tuple[int, str]]
    eval_duplicate_of: dict[int, tuple[int, str]]


class _KeptRows:
    """The rows kept so far in one split, and which of them a new text duplicates."""

    def __init__(self, exact: bool, near: bool, threshold: float):
        self._exact: dict[str, int] | None = {} if exact else None
        self._near = NearDuplicateIndex(threshold) if near else None

    def match(self, text: str) -> tuple[int, str] | None:
        """The kept row ``text`` duplicates and the kind, or None; exact is checked first."""
        if self._exact is not None and (row := self._exact.get(exact_key(text))) is not None:
            return row, "exact"
        if self._near is not None and (rows := self._near.query(text)):
            return int(rows[0]), "near"
        return None

    def add(self, row: int, text: str) -> None:
        if self._exact is not None:
            self._exact[exact_key(text)] = row
        if self._near is not None:
            self._near.add(row, text)


def deduplicate(
    train: Sequence[str],
    eval: Sequence[str] = (),
    *,
    exact: bool = True,
    near: bool = True,
    threshold: float = 0.85,
) -> DedupResult:
    """Find the rows of ``train`` and ``eval`` to drop as duplicates.

    Within train the first occurrence is kept and later duplicates are dropped. An eval row that
    duplicates a kept training row is dropped and reported as a leak: training data wins, since
    it is the evaluation that must be unseen. An eval row that duplicates an earlier kept eval row
    is dropped too. A near match names the most similar kept row. ``threshold`` is the Jaccard
    similarity of character 5-gram sets from which two texts are near duplicates.
    """
    result = DedupResult([True] * len(train), {}, [True] * len(eval), {}, {})
    kept_train = _KeptRows(exact, near, threshold)
    for row, text in enumerate(train):
        if match := kept_train.match(text):
            result.train_keep[row] = False
            result.train_duplicate_of[row] = match
        else:
            kept_train.add(row, text)

    kept_eval = _KeptRows(exact, near, threshold)
    for row, text in enumerate(eval):
        if match := kept_train.match(text):
            result.eval_keep[row] = False
            result.eval_leaks[row] = match
        elif match := kept_eval.match(text):
            result.eval_keep[row] = False
            result.eval_duplicate_of[row] = match
        else:
            kept_eval.add(row, text)
    return result


class ShingleTable:
    """What the containment search needs of texts, held in memory: each text's shingle count, its
    band hashes in the containment banding and its shingle set (one array for all of them). The
    on-disk ``FingerprintStore`` offers the same methods."""

    containment = True

    def __init__(self, texts: Sequence[str]):
        width = CONTAINMENT_BANDS * CONTAINMENT_ROWS
        sets, bands = [], []
        for start in range(0, len(texts), 4096):  # signatures a chunk at a time: 1 KB a text
            matrix = np.zeros((min(4096, len(texts) - start), width), dtype=np.uint64)
            for i, text in enumerate(texts[start : start + len(matrix)]):
                found, minhash = shingles_and_minhash(text)
                sets.append(found)
                matrix[i] = minhash.hashvalues[:width]
            bands.append(band_hashes(matrix.reshape(len(matrix), CONTAINMENT_BANDS, CONTAINMENT_ROWS)))
        self._counts = np.array([found.size for found in sets], dtype=np.uint32)
        self._starts = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)])
        self._sets = np.concatenate(sets) if sets else np.zeros(0, np.uint32)
        self._bands = np.concatenate(bands) if bands else np.zeros((0, CONTAINMENT_BANDS), np.uint32)
        self._bands[self._counts == 0] = 0

    def __len__(self) -> int:
        return len(self._counts)

    def shingle_counts(self) -> np.ndarray:
        return self._counts

    def sizes_of(self, rows: np.ndarray) -> np.ndarray:
        return self._counts[rows].astype(np.int64)

    def contain_bands(self, start: int, stop: int) -> np.ndarray:
        return self._bands[start:stop]

    def shingles_of(self, row: int) -> np.ndarray:
        return self._sets[self._starts[row] : self._starts[row + 1]]


def contained_leaks(train: Sequence[str], eval: Sequence[str], *, threshold: float = CONTAINMENT,
                    min_shingles: int = MIN_CONTAINED_SHINGLES) -> dict[int, tuple[int, str, float]]:
    """Eval rows whose shingles overlap a training row's by ``threshold`` or more of the shorter
    text's (:func:`containment`), that text having ``min_shingles`` or more: eval row -> (the
    earliest such training row found; ``"contained in"`` when the eval row is the shorter, else
    ``"contains"``; their containment). See :func:`find_contained`."""
    return leaks_after(ShingleTable([*train, *eval]), len(train), threshold=threshold, min_shingles=min_shingles)


def leaks_after(prints, n_train: int, **options) -> dict[int, tuple[int, str, float]]:
    """``contained_leaks`` of the rows of ``prints``, the first ``n_train`` of them training rows
    and the rest eval rows (numbered from 0 in the result); ``options`` go to :func:`find_contained`."""
    rows = np.arange(len(prints))
    partner = find_contained(prints, rows < n_train, rows >= n_train, **options)
    counts = prints.shingle_counts()
    return {row - n_train: (int(partner[row]), containment_kind(counts[row], counts[partner[row]]),
                            containment_of(prints, row, int(partner[row])))
            for row in np.flatnonzero(partner >= 0).tolist()}


# Eval rows kept per bucket of the containment index. Templated data fills buckets with rows that
# share most of their text, and a training row checking all of them makes the search quadratic: on
# the generated tickets of bench/data_scale.py (a few dozen sentences recombined), with no limit,
# 16 s for the 20 MB file and 76 s for the 60 MB one. With 64 it finds 99% and 98% of those leaks
# in 11 and 38 s; with 16, 96% and 94% in 9 and 18 s (the duplicates pass: 7 and 26 s).
MAX_CONTAINED_HEADS = 64
_LOOKUP_ROWS = 4096  # training rows whose buckets are looked up together: bounds their spans' memory


def find_contained(prints, train: np.ndarray, evaluation: np.ndarray, *, threshold: float = CONTAINMENT,
                   min_shingles: int = MIN_CONTAINED_SHINGLES, block_rows: int = 1 << 16,
                   on_rows: Callable[[int], None] | None = None) -> np.ndarray:
    """For each eval row of ``prints`` (a :class:`ShingleTable`, or a closed ``FingerprintStore``
    with containment band hashes), the earliest training row it overlaps by ``threshold`` or more
    (-1: none); ``train`` and ``evaluation`` are masks over the rows.

    The eval rows, fewer, are indexed: per band, the first ``MAX_CONTAINED_HEADS`` of each bucket.
    Then the training rows are read in order, ``block_rows`` at a time (``on_rows(k)`` is told after
    each block of ``k``), and look up theirs: the eval rows sharing ``MIN_SHARED_BANDS`` bands or
    more with one, and not found before, are confirmed on the exact containment of the two shingle
    sets. Memory: 8 bytes per row (the result), 4 (shingle counts) and at most 8 per band for each
    eval row (the index). The earliest training row, not the most overlapping: on templated data an
    eval row overlaps many, and looking it up ends at the first.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"containment threshold must be in (0, 1], got {threshold}")
    if not prints.containment:
        raise ValueError("the fingerprint store holds no containment band hashes: make it with containment=True")
    min_shingles = max(1, min_shingles)  # a text without shingles overlaps nothing
    counts = prints.shingle_counts()
    index = _EvalBuckets(prints, evaluation & (counts >= min_shingles), block_rows)
    partner = np.full(len(prints), -1, dtype=np.int64)
    for start in range(0, len(prints), block_rows):
        stop = min(len(prints), start + block_rows)
        rows = start + np.flatnonzero(train[start:stop] & (counts[start:stop] >= min_shingles))
        bands = prints.contain_bands(start, stop) if len(rows) and len(index) else None
        for part in range(0, len(rows) if bands is not None else 0, _LOOKUP_ROWS):
            chunk = rows[part : part + _LOOKUP_ROWS]
            lo, hi = index.spans(bands[chunk - start])
            # A row with fewer than MIN_SHARED_BANDS non-empty buckets has no candidate.
            for i in np.flatnonzero((hi > lo).sum(axis=1) >= MIN_SHARED_BANDS).tolist():
                found, shared = np.unique(index.rows(lo[i], hi[i]), return_counts=True)
                found = found[(shared >= MIN_SHARED_BANDS) & (partner[found] < 0)]
                if len(found):
                    partner[found[_overlaps(prints, int(chunk[i]), found, counts[found]) >= threshold]] = chunk[i]
        if on_rows:
            on_rows(stop - start)
    return partner


class _EvalBuckets:
    """Per containment band, the first ``MAX_CONTAINED_HEADS`` indexed rows of each bucket, as band
    hashes sorted with their rows in row order."""

    def __init__(self, prints, indexed: np.ndarray, block_rows: int):
        parts, rows = [], []
        for start in range(0, len(prints), block_rows):
            chosen = np.flatnonzero(indexed[start : start + block_rows])
            if len(chosen):
                parts.append(prints.contain_bands(start, min(len(prints), start + block_rows))[chosen])
                rows.append((start + chosen).astype(np.uint32))
        hashes = np.concatenate(parts) if parts else np.zeros((0, CONTAINMENT_BANDS), np.uint32)
        rows = np.concatenate(rows) if rows else np.zeros(0, np.uint32)
        self._hashes, self._rows = [], []
        for band in range(CONTAINMENT_BANDS):
            order = np.argsort(hashes[:, band], kind="stable")
            values = hashes[order, band]
            take = rank_in_runs(values) < MAX_CONTAINED_HEADS
            self._hashes.append(values[take])
            self._rows.append(rows[order][take])
        self._count = len(rows)

    def __len__(self) -> int:
        return self._count

    def spans(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row and band of ``hashes``: where its bucket's rows lie in that band, ``lo`` to ``hi``."""
        lo, hi = np.empty(hashes.shape, np.int64), np.empty(hashes.shape, np.int64)
        for band, known in enumerate(self._hashes):
            lo[:, band] = np.searchsorted(known, hashes[:, band], "left")
            hi[:, band] = np.searchsorted(known, hashes[:, band], "right")
        return lo, hi

    def rows(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The rows of one row's buckets, a row once per band it shares."""
        return np.concatenate([self._rows[band][lo[band] : hi[band]] for band in np.flatnonzero(hi > lo).tolist()])


def _overlaps(prints, row: int, others: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The containment of ``row`` with each of ``others`` (whose shingle counts are ``counts``)."""
    mine = prints.shingles_of(row)
    theirs = np.concatenate([prints.shingles_of(other) for other in others.tolist()])
    at = np.minimum(np.searchsorted(mine, theirs), len(mine) - 1)
    common = np.add.reduceat(mine[at] == theirs, np.r_[0, np.cumsum(counts, dtype=np.int64)[:-1]]).astype(np.int64)
    # The division :func:`containment` makes, in the same float64 rounding.
    return common / np.minimum(len(mine), counts.astype(np.int64))


def containment_of(prints, row: int, other: int) -> float:
    """The containment of two rows of ``prints`` (as :func:`find_contained` takes it)."""
    return float(_overlaps(prints, row, np.array([other]), prints.sizes_of(np.array([other])))[0])


def rank_in_runs(values: np.ndarray) -> np.ndarray:
    """Each element's place within its run of equal sorted ``values``."""
    place = np.arange(len(values))
    if not len(values):
        return place
    starts = np.r_[True, values[1:] != values[:-1]]
    return place - np.maximum.accumulate(np.where(starts, place, 0))


def containment_kind(eval_size: int, train_size: int) -> str:
    """How an eval row of ``eval_size`` shingles overlaps a training row of ``train_size``."""
    return "contained in" if eval_size <= train_size else "contains"


def containment_reason(kind: str, target: str, value: float) -> str:
    """Why an eval row was dropped as contained in (or containing) training row ``target``."""
    # Rounded down, 0.996 is not shown as 1.00 (the epsilon keeps 0.57, stored as 0.5699..., at 0.57).
    return f"{kind} training row {target} (containment {math.floor(value * 100 + 1e-9) / 100:.2f})"
