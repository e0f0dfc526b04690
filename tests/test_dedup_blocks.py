"""Block-wise duplicate decisions (data.dedup_index): rows decided one block at a time reach the
same decisions as the in-memory dedup and as any other block size, with partners, chains and
leaks across blocks."""

from __future__ import annotations

import numpy as np
import pytest
from test_dedup import ONE_WORD_CHANGED, SAME_TOPIC, TICKET, random_corpus

from domaintune.data import dedup_index
from domaintune.data.dedup import deduplicate, jaccard, shingles
from domaintune.data.dedup_index import FingerprintStore, Fingerprints, deduplicate_compact, exact_hash, \
    find_duplicates, fingerprint

# Two words changed: close to ONE_WORD_CHANGED (one word apart), not to TICKET (two words apart).
TWO_STEPS_AWAY = ONE_WORD_CHANGED.replace("blue", "green")
CLOSER_TWO_STEPS_AWAY = ONE_WORD_CHANGED.replace("mug", "cup")  # nearer ONE_WORD_CHANGED than TICKET is


def test_the_chain_texts_sit_either_side_of_the_threshold():
    similarity = lambda a, b: jaccard(shingles(a), shingles(b))
    assert similarity(TICKET, ONE_WORD_CHANGED) >= 0.85
    assert similarity(ONE_WORD_CHANGED, TWO_STEPS_AWAY) >= 0.85
    assert similarity(TICKET, TWO_STEPS_AWAY) < 0.85
    assert similarity(TICKET, CLOSER_TWO_STEPS_AWAY) < 0.85
    assert similarity(ONE_WORD_CHANGED, CLOSER_TWO_STEPS_AWAY) > similarity(ONE_WORD_CHANGED, TICKET)


@pytest.mark.parametrize("block_rows", [1, 2, 100])
def test_a_near_duplicate_finds_its_partner_in_an_earlier_block(block_rows):
    train = [TICKET, *SAME_TOPIC, ONE_WORD_CHANGED]
    result = deduplicate_compact(train, block_rows=block_rows)
    assert result.train_duplicate_of == {len(train) - 1: (0, "near")}
    assert result == deduplicate(train)


@pytest.mark.parametrize("block_rows", [1, 2, 3, 100])
def test_chains_across_blocks_match_kept_rows_only(block_rows):
    # 1 is dropped as near 0; 2 is near 1 only, and 1 is not kept, so 2 stays; 4 repeats the
    # dropped 1 exactly, so it is matched on its text to the kept 0, not to 1.
    train = [TICKET, ONE_WORD_CHANGED, TWO_STEPS_AWAY, SAME_TOPIC[0], ONE_WORD_CHANGED.upper() + "!"]
    result = deduplicate_compact(train, block_rows=block_rows)
    assert result.train_duplicate_of == {1: (0, "near"), 4: (0, "near")}
    assert result == deduplicate(train)


@pytest.mark.parametrize("block_rows", [1, 2, 3, 100])
def test_a_repeat_of_a_row_dropped_in_an_earlier_block_takes_the_most_similar_kept_row(block_rows):
    # 1 is dropped as near 0; 3 repeats it, and 2, kept in between, is closer to it than 0 is,
    # also when 2 and 3 share a block that 1 is not in.
    train = [TICKET, ONE_WORD_CHANGED, CLOSER_TWO_STEPS_AWAY, ONE_WORD_CHANGED.upper()]
    result = deduplicate_compact(train, block_rows=block_rows)
    assert result.train_duplicate_of == {1: (0, "near"), 3: (2, "near")}
    assert result == deduplicate(train)


@pytest.mark.parametrize("block_rows", [1, 4])
def test_eval_leaks_and_eval_duplicates_across_blocks(block_rows):
    train = [TICKET, SAME_TOPIC[0], SAME_TOPIC[1]]
    evaluation = [SAME_TOPIC[2], ONE_WORD_CHANGED, SAME_TOPIC[3], SAME_TOPIC[2].lower(), SAME_TOPIC[1] + " thanks"]
    result = deduplicate_compact(train, evaluation, block_rows=block_rows)
    assert result.eval_leaks == {1: (0, "near"), 4: (2, "near")}
    assert result.eval_duplicate_of == {3: (0, "exact")}
    assert result == deduplicate(train, evaluation)


@pytest.mark.parametrize("exact,near", [(True, True), (False, True), (True, False)])
def test_one_row_blocks_decide_as_one_large_block_and_as_memory(exact, near):
    texts = random_corpus(seed=21, size=700)
    train, evaluation = texts[:550], texts[500:]
    large = deduplicate_compact(train, evaluation, exact=exact, near=near)
    assert large.train_duplicate_of and large.eval_leaks
    assert deduplicate_compact(train, evaluation, exact=exact, near=near, block_rows=1) == large
    assert deduplicate_compact(train, evaluation, exact=exact, near=near, block_rows=37) == large
    assert large == deduplicate(train, evaluation, exact=exact, near=near)


def test_block_size_does_not_matter_when_buckets_overflow(monkeypatch):
    monkeypatch.setattr(dedup_index, "MAX_BUCKET_HEADS", 2)
    texts = random_corpus(seed=22, size=500)
    results = [deduplicate_compact(texts, block_rows=rows) for rows in (1, 5, 64, 1000)]
    assert all(result == results[0] for result in results[1:])


def _store_of(tmp_path, texts: list[str], same_bucket: bool) -> FingerprintStore:
    store = FingerprintStore(tmp_path / "prints", 0.85)
    prints = fingerprint(texts, 0.85)
    if same_bucket:  # every row in one bucket of every band, whatever its text
        prints = Fingerprints(prints.exact, np.full_like(prints.bands, 7), prints.sizes, prints.sets)
    store.append(prints)
    store.close()
    return store


@pytest.mark.parametrize("block_rows", [1, 3, 50])
def test_a_full_bucket_offers_its_first_kept_rows_and_dropped_rows_take_no_room(tmp_path, monkeypatch, block_rows):
    near_last = SAME_TOPIC[2].replace("two", "three")
    texts = [TICKET, ONE_WORD_CHANGED, SAME_TOPIC[0], SAME_TOPIC[1], SAME_TOPIC[2], near_last]
    store = _store_of(tmp_path, texts, same_bucket=True)
    # Kept before the last row: 0, 2, 3, 4 (1 is dropped as near 0); the last is near 4 only.
    monkeypatch.setattr(dedup_index, "MAX_BUCKET_HEADS", 4)
    decisions = find_duplicates(store, len(texts), block_rows=block_rows)
    assert decisions.duplicate_of.tolist() == [-1, 0, -1, -1, -1, 4]
    assert decisions.near.tolist() == [False, True, False, False, False, True]
    monkeypatch.setattr(dedup_index, "MAX_BUCKET_HEADS", 3)
    decisions = find_duplicates(store, len(texts), block_rows=block_rows)
    assert decisions.duplicate_of.tolist() == [-1, 0, -1, -1, -1, -1]


def test_progress_is_told_every_row_once_per_block(tmp_path):
    texts = random_corpus(seed=23, size=25)
    told: list[int] = []
    find_duplicates(_store_of(tmp_path, texts, same_bucket=False), 25, block_rows=10,
                    on_rows=told.append)
    assert told == [10, 10, 5]


def test_the_store_reads_back_any_block_of_what_was_appended(tmp_path):
    texts = random_corpus(seed=24, size=30) + ["?!", ""]
    store = FingerprintStore(tmp_path / "prints", 0.85)
    whole = fingerprint(texts, 0.85)
    store.append(fingerprint(texts[:11], 0.85))
    store.append(fingerprint(texts[11:], 0.85))
    store.close()
    assert len(store) == len(texts)
    block = store.block(9, 32)
    assert block.exact.tolist() == [exact_hash(t) for t in texts[9:]]
    assert np.array_equal(block.bands, whole.bands[9:]) and block.bands.shape == (23, store.bands)
    assert block.shingled.tolist() == [True] * 21 + [False, False]
    assert all(np.array_equal(store.shingles_of(i), shingles(t)) for i, t in enumerate(texts))
    assert store.sizes_of(np.arange(len(texts))).tolist() == [len(shingles(t)) for t in texts]
    store.release()


def _lengthened(texts: list[str], seed: int) -> list[str]:
    """``texts`` with copies grown by one to six words mixed in: pairs on either side of the size bound."""
    rng = np.random.default_rng(seed)
    mixed = list(texts)
    for i in rng.choice(len(texts), size=len(texts) // 3, replace=False).tolist():
        mixed.insert(int(rng.integers(i, len(mixed) + 1)), texts[i] + " extra" * int(rng.integers(1, 7)))
    return mixed


def test_shingle_counts_rule_out_a_pair_before_any_set_is_read_and_change_no_decision(tmp_path, monkeypatch):
    longer = TICKET + " The box was dented on one corner too, and the packing slip was missing."
    assert jaccard(shingles(TICKET), shingles(longer)) < 0.85  # the pair fails the exact check anyway
    prints = fingerprint([TICKET, longer], 0.85)
    assert min(prints.sizes) / max(prints.sizes) < 0.85  # ... and the size bound already says so

    def reads(bound) -> list[int]:
        monkeypatch.setattr(dedup_index, "_may_reach", bound)
        store = FingerprintStore(tmp_path / f"prints-{len(read)}", 0.85)  # one bucket: always candidates
        store.append(Fingerprints(prints.exact, np.full_like(prints.bands, 7), prints.sizes, prints.sets))
        store.close()
        shingles_of = store.shingles_of
        monkeypatch.setattr(store, "shingles_of", lambda row: read.append(row) or shingles_of(row))
        assert find_duplicates(store, 2).duplicate_of.tolist() == [-1, -1]
        store.release()
        return sorted(read)

    read: list[int] = []
    assert reads(dedup_index._may_reach) == []
    assert reads(lambda size, sizes, threshold: np.ones(len(sizes), bool)) == [0, 1]  # without the bound both are read
    monkeypatch.undo()

    texts = _lengthened(random_corpus(seed=25, size=400), seed=25)
    train, evaluation = texts[:400], texts[350:]
    rejected = []
    bound = dedup_index._may_reach
    monkeypatch.setattr(dedup_index, "_may_reach", lambda *args: rejected.append(not bound(*args).all()) or bound(*args))
    with_bound = deduplicate_compact(train, evaluation, block_rows=50)
    assert any(rejected)
    monkeypatch.setattr(dedup_index, "_may_reach", lambda size, sizes, threshold: np.ones(len(sizes), bool))
    assert deduplicate_compact(train, evaluation, block_rows=50) == with_bound
    assert with_bound.train_duplicate_of and with_bound.eval_leaks
