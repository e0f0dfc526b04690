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
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Hashable, Sequence

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


def _already_hashed(value: int) -> int:
    return value


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
