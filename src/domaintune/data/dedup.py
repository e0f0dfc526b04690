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
least ``MIN_CONTAINED_SHINGLES`` shingles long, an eval row leaked. Containment does not fall with
the length ratio of the two rows, but their Jaccard does (about c/ρ when one row has ρ times the
other's shingles), so a MinHash banding misses the pairs that matter most: a question that is the
first sentence of a long answer, a paragraph cut from a long document. The search
(:func:`find_contained`) samples the shorter row instead: its bottom-k sketch (its ``SKETCH_SIZE``
smallest shingle hashes, a uniform sample of its shingles since the hashes are mixed) is indexed,
the other side's whole shingle sets are looked up, and a pair sharing enough sketch shingles
(:func:`required_hits`, derived from the threshold) is confirmed on the exact containment of the
two sets; once each way round, eval rows indexed and then training rows. Recall is the same at
every length ratio (99.5% at exactly 0.9, more above it; bench/containment_recall.py). It runs in
memory (:class:`ShingleTable`) and on the streaming path's fingerprint files alike.
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
# Containment candidates come from bottom-k sketches (:func:`find_contained`): the shorter row of a
# pair is sampled by its SKETCH_SIZE smallest shingle hashes, and a pair is a candidate when enough
# of them are in the longer row. Eight makes at most 128 bytes of index per row (a row number, a
# hash and where its rows begin, a sketch shingle) and, at the default threshold, 5 hits needed: a
# pair at containment 0.9 reaches them with probability 0.995 whatever the lengths, while a pair
# at 0.6 does 59% of the time and one at 0.3 6%, each false candidate only costing an exact check
# (12 would need 8 hits: 0.996, 44% and 1%, for 50% more index and more hits to count).
SKETCH_SIZE = 8
# Templated data (the same sentences in thousands of rows) gives some shingles thousands of rows,
# each then looked at by every scanned row that has the shingle: a quadratic search. So a sketch
# is taken from the row's shingles found in at most COMMON_ROWS indexed rows (counted
# approximately), and each shingle of the index keeps its first MAX_POSTINGS rows, which bounds
# the work per scanned shingle. A row with fewer than SKETCH_SIZE such shingles fills its sketch
# with its smallest common ones (which the cap may cut off). Skipping common shingles costs recall
# where they are most of a row: its rare shingles (numbers, names, where two sentences meet) are
# where two rows of one template differ, so a sketch of them sees a lower containment than the
# rows have. On the generated tickets of bench/data_scale.py (20 MB, 79,006 distinct rows, 20% of
# them eval, in process): 1,024 and 256 find 12,859 leaks in 27-32 s; 512 and 256, 12,289 in 13 s;
# 64 and 64, 11,537 in 16 s; no skipping and 256, 11,968 in 45 s (the cap cuts off more); the
# MinHash banding this replaced found 13,088 in 18 s there, and missed most pairs of rows of
# different lengths (see README.md).
COMMON_ROWS = 1024
MAX_POSTINGS = 256


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
    """What the containment search needs of texts, held in memory: each text's shingle count and
    its shingle set (one array for all of them). The on-disk ``FingerprintStore`` offers the same
    methods."""

    def __init__(self, texts: Sequence[str]):
        sets = [shingles(text) for text in texts]
        self._counts = np.array([found.size for found in sets], dtype=np.uint32)
        self._starts = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)])
        self._sets = np.concatenate(sets).astype(np.uint32) if sets else np.zeros(0, np.uint32)

    def __len__(self) -> int:
        return len(self._counts)

    def shingle_counts(self) -> np.ndarray:
        return self._counts

    def sizes_of(self, rows: np.ndarray) -> np.ndarray:
        return self._counts[rows].astype(np.int64)

    def shingles_of(self, row: int) -> np.ndarray:
        return self._sets[self._starts[row] : self._starts[row + 1]]

    def sets_of(self, start: int, stop: int) -> np.ndarray:
        """The shingle sets of rows ``start .. stop-1``, one after the other."""
        return self._sets[self._starts[start] : self._starts[stop]]


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


@lru_cache(maxsize=64)
def required_hits(threshold: float, size: int = SKETCH_SIZE, recall: float = 0.99) -> int:
    """How many of a row's ``size`` sketch shingles a pair must share to be a candidate: the most
    that a pair at containment ``threshold`` reaches with probability ``recall`` or more.

    Each sketch shingle of the shorter row is one of its shingles drawn at random (the hashes are
    uniform), so at containment c it is in the longer row with probability c, and the hits of
    ``size`` of them are Binomial(size, c) (hypergeometric, drawn without replacement, for a short
    row: more concentrated, so the recall is the same or higher). Derived from the threshold, not
    tuned to 0.9: at 1.0 every sketch shingle must be there, at 0.8 three of eight."""
    def at_least(hits: int) -> float:
        return sum(math.comb(size, j) * threshold**j * (1 - threshold) ** (size - j) for j in range(hits, size + 1))
    return max([hits for hits in range(1, size + 1) if at_least(hits) >= recall - 1e-12], default=1)


_DF_BITS = 22  # document frequency counters: 4M of them (16 MB); a collision only overstates a count
_PRESENT_BITS = 23  # a table saying which hashes may be sketch shingles, to skip the rest before searching
_BLOCK_SHINGLES = 1 << 20  # shingles read at once: bounds a block's arrays (some 30 bytes a shingle)
_PAIR_BUDGET = 1 << 20  # hits expanded and counted at once, and shingles searched at once to confirm


def find_contained(prints, train: np.ndarray, evaluation: np.ndarray, *, threshold: float = CONTAINMENT,
                   min_shingles: int = MIN_CONTAINED_SHINGLES, block_rows: int = 1 << 16,
                   on_rows: Callable[[int], None] | None = None) -> np.ndarray:
    """For each eval row of ``prints`` (a :class:`ShingleTable`, or a closed ``FingerprintStore``),
    the earliest training row it overlaps by ``threshold`` or more (-1: none); ``train`` and
    ``evaluation`` are masks over the rows.

    Containment is the share of the shorter row's shingles found in the longer one, so the shorter
    row is sampled: by its sketch, its ``SKETCH_SIZE`` smallest shingle hashes (a uniform sample
    of its shingles, whatever the other row's length), and a pair sharing ``required_hits`` of
    them or more is a candidate, confirmed on the exact containment of the two shingle sets. Two
    passes, one per direction:

    * eval row the shorter (``"contained in"``): the eval rows' sketches are indexed, and the
      training rows' whole shingle sets are read in order, by blocks, and looked up;
    * training row the shorter (``"contains"``): the training rows' sketches are indexed, up to
      4 blocks of them at a time, and the eval rows' sets are looked up in each index.

    An indexed row needs ``required_hits(threshold, k)`` of its ``k`` sketch shingles the index
    kept (``k`` is ``SKETCH_SIZE`` unless the row is shorter or a posting list was full).
    ``on_rows(k)`` is told after each block of ``k`` rows of each pass: ``2 * len(prints)`` in all.
    The earliest training row of those found, not the most overlapping: on templated data an eval
    row overlaps many, and each pass checks an eval row's candidates in training-row order and
    stops at the first confirmed.

    Memory: 21 bytes per row (the result, the shingle counts, where each set ends, the hits each
    indexed row needs); the index, at most ``SKETCH_SIZE`` entries per indexed row, 4 bytes each
    (a row number) and 12 per distinct hash (the hash, where its rows begin): at most 128 bytes an
    indexed row, some 32 an entry while it is sorted; the eval rows are indexed in the first pass,
    4 blocks of training rows at a time in the second. Besides: 16 MB of frequency counters (and
    32 MB while counting a block), an 8 MB table of the index's hashes, and a block's arrays, about
    ``_BLOCK_SHINGLES`` shingles and ``_PAIR_BUDGET`` hits at 8 bytes each a few times over.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"containment threshold must be in (0, 1], got {threshold}")
    min_shingles = max(1, min_shingles)  # a text without shingles overlaps nothing
    counts = prints.shingle_counts()
    search = _Search(prints, counts, threshold, block_rows)
    eligible = counts >= min_shingles
    # Eval row the shorter: index the eval rows, scan the training rows.
    index = search.index(evaluation & eligible, 0, len(prints))
    for start, stop in search.blocks(0, len(prints)):
        if len(index):
            search.scan(index, train & eligible, start, stop, scanned_is_train=True)
        if on_rows:
            on_rows(stop - start)
    del index
    # Training row the shorter: index the training rows, 4 blocks at a time, scan the eval rows.
    group = block_rows * 4
    for first in range(0, len(prints), group):
        last = min(len(prints), first + group)
        index = search.index(train[first:last] & eligible[first:last], first, last)
        # An eval row already found overlapping an earlier training row than these has no better one here.
        settled = (search.partner >= 0) & (search.partner < first)
        if len(index):
            for start, stop in search.blocks(0, len(prints)):
                search.scan(index, evaluation & eligible & ~settled, start, stop, scanned_is_train=False)
        del index, settled
        if on_rows:
            on_rows(last - first)
    return search.partner


@dataclass
class _Index:
    """Sketch shingles of indexed rows: ``keys`` sorted and distinct, the rows of ``keys[i]`` at
    ``rows[starts[i]:starts[i + 1]]`` (row order, at most ``MAX_POSTINGS``), and ``present``, a
    table of the low bits of every key."""

    keys: np.ndarray
    starts: np.ndarray
    rows: np.ndarray
    present: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


class _Search:
    """The state of :func:`find_contained`: per row its partner so far and the hits it needs."""

    def __init__(self, prints, counts: np.ndarray, threshold: float, block_rows: int):
        self.prints, self.threshold, self.block_rows = prints, threshold, max(1, block_rows)
        self.counts = counts
        self.ends = np.cumsum(counts, dtype=np.int64)
        self.partner = np.full(len(counts), -1, dtype=np.int64)
        # Hits needed by an indexed row, by how many of its sketch shingles the index kept.
        self._needed = np.array([0] + [required_hits(threshold, k) for k in range(1, SKETCH_SIZE + 1)], np.uint8)
        self.need = np.zeros(len(counts), dtype=np.uint8)  # 0: not in the current index

    def blocks(self, start: int, stop: int):
        """Rows ``start .. stop-1`` in blocks of at most ``block_rows`` rows and, where rows are
        long, about ``_BLOCK_SHINGLES`` shingles (a block has at least one row)."""
        while start < stop:
            end = min(stop, start + self.block_rows)
            before = self.ends[start - 1] if start else 0
            end = max(start + 1, min(end, int(np.searchsorted(self.ends, before + _BLOCK_SHINGLES, "right"))))
            yield start, end
            start = end

    def read(self, chosen: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows ``chosen`` (a mask over all rows) of ``start .. stop-1``: their numbers, their
        shingle counts and their shingle sets one after the other."""
        rows = start + np.flatnonzero(chosen[start:stop])
        if not len(rows):
            return rows, np.zeros(0, np.int64), np.zeros(0, np.uint32)
        sizes = self.counts[start:stop].astype(np.int64)
        values = self.prints.sets_of(start, stop)
        if len(rows) < stop - start:
            values = values[np.repeat(chosen[start:stop], sizes)]
        return rows, sizes[rows - start], values

    def index(self, chosen: np.ndarray, start: int, stop: int) -> _Index:
        """The index of the sketches of rows ``chosen`` (a mask over ``start .. stop-1``)."""
        mask = np.zeros(len(self.counts), dtype=bool)
        mask[start:stop] = chosen
        self.need[:] = 0
        frequency = np.zeros(1 << _DF_BITS, dtype=np.uint32)
        low = np.uint32((1 << _DF_BITS) - 1)
        for begin, end in self.blocks(start, stop):  # first how many indexed rows have each shingle
            _, _, values = self.read(mask, begin, end)
            if len(values):
                frequency += np.bincount(values & low, minlength=len(frequency)).astype(np.uint32)
        keys, rows = [], []
        for begin, end in self.blocks(start, stop):  # then each row's sketch
            found, sizes, values = self.read(mask, begin, end)
            if len(found):
                sketch, owner = _sketches(values, sizes, frequency[values & low] > COMMON_ROWS)
                keys.append(sketch)
                rows.append(found[owner].astype(np.uint32))
        del frequency
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint32)
        rows = np.concatenate(rows) if rows else np.zeros(0, np.uint32)
        # Sorted by key, then row; each key keeps its first MAX_POSTINGS rows.
        both = np.sort((keys.astype(np.uint64) << np.uint64(32)) | rows)
        del keys, rows
        keys = (both >> np.uint64(32)).astype(np.uint32)
        keep = rank_in_runs(keys) < MAX_POSTINGS
        keys, rows = keys[keep], (both[keep] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        del both
        new = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
        starts = np.r_[np.flatnonzero(new), len(keys)].astype(np.int64)
        kept = np.bincount(rows, minlength=len(self.counts)) if len(rows) else np.zeros(len(self.counts), np.int64)
        self.need[:] = self._needed[kept]
        present = np.zeros(1 << _PRESENT_BITS, dtype=bool)
        present[keys & np.uint32((1 << _PRESENT_BITS) - 1)] = True
        return _Index(keys[new], starts, rows, present)

    def scan(self, index: _Index, chosen: np.ndarray, start: int, stop: int, *, scanned_is_train: bool) -> None:
        """Look the rows ``chosen`` of ``start .. stop-1`` up in ``index``, and confirm their
        candidates: a pair is one when it shares the hits its indexed row (the shorter) needs."""
        rows, sizes, values = self.read(chosen, start, stop)
        if not len(rows):
            return
        owner = np.repeat(np.arange(len(rows)), sizes)
        maybe = np.flatnonzero(index.present[values & np.uint32((1 << _PRESENT_BITS) - 1)])
        at = np.searchsorted(index.keys, values[maybe])
        found = at < len(index.keys)
        found[found] = index.keys[at[found]] == values[maybe[found]]
        at, hit_owner = at[found], owner[maybe[found]]
        span = index.starts[at + 1] - index.starts[at]
        # Rows a chunk at a time, so that the hits expanded at once stay within _PAIR_BUDGET.
        per_row = np.bincount(hit_owner, weights=span, minlength=len(rows)).astype(np.int64)
        first_hit = np.searchsorted(hit_owner, _chunks(per_row, _PAIR_BUDGET)).tolist()
        for a, b in zip(first_hit[:-1], first_hit[1:]):
            if a == b:
                continue
            pair_owner = np.repeat(hit_owner[a:b], span[a:b])
            other = index.rows[_ranges(index.starts[at[a:b]], span[a:b])].astype(np.int64)
            mine = rows[pair_owner]
            train_row, eval_row = (mine, other) if scanned_is_train else (other, mine)
            # The indexed row is the shorter (equal lengths: the eval row), and the pair could
            # still name an earlier training row than the one found so far.
            short = sizes[pair_owner] >= self.counts[other] if scanned_is_train \
                else sizes[pair_owner] > self.counts[other]
            best = self.partner[eval_row]
            open_ = short & ((best < 0) | (train_row < best))
            pairs, hits = np.unique((pair_owner[open_].astype(np.uint64) << np.uint64(32))
                                    | other[open_].astype(np.uint64), return_counts=True)
            del pair_owner, other, mine, train_row, eval_row, short, best, open_
            candidate_owner = (pairs >> np.uint64(32)).astype(np.int64)
            candidate = (pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)
            enough = hits >= self.need[candidate]
            if enough.any():
                self._confirm(rows, sizes, values, candidate_owner[enough], candidate[enough], scanned_is_train)

    def _confirm(self, rows: np.ndarray, sizes: np.ndarray, values: np.ndarray, owner: np.ndarray,
                 other: np.ndarray, scanned_is_train: bool) -> None:
        """Find, per eval row, the earliest training row among the candidates (scanned row
        ``rows[owner]``, indexed row ``other``) that reaches the threshold.

        An eval row's candidates are checked in training-row order, 1, 2, 4, ... at a time, and no
        more once one is confirmed: on templated data an eval row that leaked has hundreds of
        candidates, nearly all of them at the threshold, and checking them all was most of the time.
        """
        mine = rows[owner]
        train_row, eval_row = (mine, other) if scanned_is_train else (other, mine)
        order = np.lexsort((train_row, eval_row))
        owner, other, train_row, eval_row = owner[order], other[order], train_row[order], eval_row[order]
        start = np.flatnonzero(np.r_[True, eval_row[1:] != eval_row[:-1]])
        end = np.r_[start[1:], len(eval_row)]
        at, active, step = start.copy(), np.arange(len(start)), 1
        while len(active):
            take = np.minimum(step, end[active] - at[active])
            chosen = _ranges(at[active], take)
            ok = self._reaches(rows, sizes, values, owner[chosen], other[chosen])
            # The first confirmed pair of each eval row: its earliest training row of this round.
            group = np.repeat(active, take)
            hit, first = np.unique(group[ok], return_index=True)
            pair = chosen[ok][first]
            best = self.partner[eval_row[pair]]
            better = (best < 0) | (train_row[pair] < best)
            self.partner[eval_row[pair][better]] = train_row[pair][better]
            at[active] += take
            done = np.zeros(len(start), dtype=bool)
            done[hit] = True
            active = active[~done[active] & (at[active] < end[active])]
            step *= 2

    def _reaches(self, rows: np.ndarray, sizes: np.ndarray, values: np.ndarray, owner: np.ndarray,
                 other: np.ndarray) -> np.ndarray:
        """Whether each pair (scanned row ``rows[owner]``, indexed row ``other``) has a containment
        of the threshold or more, computed exactly, about ``_PAIR_BUDGET`` shingles at a time."""
        # In scanned-row order, so that the shingles searched for come nearly sorted (a faster search).
        order = np.argsort(owner, kind="stable")
        owner, other = owner[order], other[order]
        ok = np.zeros(len(owner), dtype=bool)
        lengths = self.counts[other].astype(np.int64)
        cuts = _chunks(lengths, _PAIR_BUDGET)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            mine, theirs_rows = owner[a:b], other[a:b]
            # The scanned rows' sets, each numbered in the high bits by its place among them: one
            # sorted array in which the indexed rows' shingles are all searched at once.
            used, place = np.unique(mine, return_inverse=True)
            sorted_keys = (np.repeat(np.arange(len(used), dtype=np.uint64), sizes[used]) << np.uint64(32)) \
                | values[_ranges(starts[used], sizes[used])]
            theirs, back = np.unique(theirs_rows, return_inverse=True)
            sets = [self.prints.shingles_of(row) for row in theirs.tolist()]
            length = np.array([len(found) for found in sets], dtype=np.int64)
            concatenated = np.concatenate(sets).astype(np.uint32)
            per_pair = length[back]
            query = (np.repeat(place.astype(np.uint64), per_pair) << np.uint64(32)) \
                | concatenated[_ranges(np.r_[0, np.cumsum(length)[:-1]][back], per_pair)]
            where = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
            common = np.bincount(np.repeat(np.arange(len(mine)), per_pair), weights=sorted_keys[where] == query,
                                 minlength=len(mine)).astype(np.int64)
            # The division :func:`containment` makes, in the same float64 rounding.
            ok[a:b] = common / np.minimum(sizes[mine], per_pair) >= self.threshold
        back = np.empty_like(ok)
        back[order] = ok
        return back


def _sketches(values: np.ndarray, sizes: np.ndarray, common: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sketch: its ``SKETCH_SIZE`` smallest shingles that are not ``common``, then, if
    it has fewer, its smallest common ones. ``values`` are the rows' sets one after the other
    (each sorted), ``sizes`` their lengths. Returns the sketch shingles and the row of each."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    rare = ~common
    # Each shingle's place among its row's rare (or common) shingles, in hash order.
    rare_before = np.cumsum(rare) - rare
    rare_place = rare_before - rare_before[starts][owner]
    common_place = np.arange(len(values)) - starts[owner] - rare_place
    rare_count = np.add.reduceat(rare.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    take = np.where(rare, rare_place < SKETCH_SIZE, common_place < SKETCH_SIZE - rare_count[owner])
    return values[take], owner[take]


def _chunks(weights: np.ndarray, budget: int) -> np.ndarray:
    """Cut points 0 = c0 < c1 < ... = len(weights) such that each run's weights sum to at most
    ``budget``, or is one element."""
    total = np.cumsum(weights)
    cuts, at = [0], 0
    while at < len(weights):
        nxt = int(np.searchsorted(total, (total[at - 1] if at else 0) + budget, "right"))
        at = max(at + 1, nxt)
        cuts.append(min(at, len(weights)))
    return np.array(cuts, dtype=np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``starts[i], starts[i] + 1, ..., starts[i] + lengths[i] - 1`` for each i, one after the other."""
    lengths = lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - ends + lengths, lengths)


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
