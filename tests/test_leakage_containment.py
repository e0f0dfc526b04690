"""Leakage by containment: an eval row that is a training row plus a sentence (or the other way
round) stays below the near-duplicate threshold, yet the model has seen it. Such rows are dropped
from eval and reported as leakage, in memory and streaming, with an eval file and with a split."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ticket_rows, write_jsonl, write_recipe
from test_dedup import ONE_WORD_CHANGED, SAME_TOPIC, TICKET, random_corpus

from domaintune.data import dedup, dedup_index
from domaintune.data.dedup import jaccard, shingles
from domaintune.data.prepare import prepare, write_prepared
from domaintune.data.stream import prepare_streaming
from domaintune.errors import DataError, RecipeError
from domaintune.recipe import load_recipe

SENTENCE = "The courier also left the box out in the rain."
LONGER = TICKET + " " + SENTENCE  # the audit's case: a ticket with a short sentence appended
SHORT = "where is my refund"  # 14 shingles: a common phrase, inside many longer tickets
INSIDE_SHORT = "Hello, I placed an order three weeks ago, where is my refund? Nobody has answered my e-mails."
TICKETS = Path(__file__).resolve().parents[1] / "recipes" / "support-intents" / "data" / "tickets.csv"


def _share(a: str, b: str) -> float:
    """Containment, computed apart from the module: shared shingles over the smaller set's."""
    x, y = set(shingles(a).tolist()), set(shingles(b).tolist())
    return len(x & y) / min(len(x), len(y))


def test_the_pairs_sit_where_the_tests_need_them():
    assert jaccard(shingles(TICKET), shingles(LONGER)) < 0.85  # the near-duplicate rule misses it
    assert _share(TICKET, LONGER) == 1.0
    assert _share(TICKET, LONGER.replace("yesterday", "today")) > 0.9  # a word changed as well
    assert all(_share(TICKET, other) < 0.5 for other in SAME_TOPIC)
    assert _share(SHORT, INSIDE_SHORT) == 1.0 and shingles(SHORT).size < dedup.MIN_CONTAINED_SHINGLES


def _rows(texts: list[str], label: str = "billing") -> list[dict]:
    return [{"text": text, "label": label} for text in texts]


def _both_paths(tmp_path: Path, train: list[dict], evaluation: list[dict] | None, **data) -> list[tuple]:
    """(dropped rows, kept eval texts, card) from the in-memory and the streaming path."""
    write_jsonl(tmp_path / "data" / "train.jsonl", train)
    files = {"train": "data/train.jsonl"}
    if evaluation is not None:
        write_jsonl(tmp_path / "data" / "eval.jsonl", evaluation)
        files["eval"] = "data/eval.jsonl"
    recipe = write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": "classification", "base_model": "minilm-l6",
                                                     "data": {**files, "on_bad_rows": "quarantine", **data}})
    spec = load_recipe(recipe)
    prepared = prepare(spec, tmp_path)
    write_prepared(prepared, tmp_path / "memory", quarantine=True)
    prepare_streaming(spec, tmp_path, tmp_path / "stream", workers=1)
    out = []
    for directory in (tmp_path / "memory", tmp_path / "stream"):
        read = lambda name: [json.loads(line) for line in (directory / "data" / name).read_text().splitlines()]
        card = json.loads((directory / "data_card.json").read_text())
        assert card["rows_in"] == card["dropped_total"] + card["kept"]["train"] + card["kept"]["eval"]
        out.append((read("quarantine.jsonl"), [r["text"] for r in read("eval.jsonl")], card))
    by_place = lambda dropped: {d["where"]: d for d in dropped}
    assert by_place(out[0][0]) == by_place(out[1][0])  # the same rows dropped for the same reasons
    return out


def _filler(seed: int) -> list[dict]:
    return [{"text": r["text"], "label": r["label"]} for r in ticket_rows(4, seed=seed)]


def test_an_eval_row_that_is_a_training_row_plus_a_sentence_is_leakage(tmp_path):
    train = _filler(1) + _rows([TICKET])
    evaluation = _filler(2) + _rows([LONGER])
    for dropped, kept, card in _both_paths(tmp_path, train, evaluation):
        leaks = [d for d in dropped if d["step"] == "leakage"]
        assert [d["where"] for d in leaks] == [f"{tmp_path}/data/eval.jsonl:{len(evaluation)}"]
        assert leaks[0]["reason"] == f"contains training row {tmp_path}/data/train.jsonl:{len(train)} (containment 1.00)"
        assert LONGER not in kept and len(kept) == len(evaluation) - 1
        assert card["dropped"]["leakage"] == {"train": 0, "eval": 1}
        assert card["reasons"]["leakage"] == {"contains a training row": 1}
        assert card["dedup"]["leaks"] == [{"where": leaks[0]["where"], "reason": leaks[0]["reason"]}]


def test_an_eval_row_inside_a_longer_training_row_is_leakage(tmp_path):
    edited = LONGER.replace("yesterday", "today")  # the training row has a word changed too
    train = _rows([edited]) + _filler(3)
    evaluation = _rows([TICKET]) + _filler(4)
    value = _share(TICKET, edited)
    for dropped, kept, card in _both_paths(tmp_path, train, evaluation):
        leaks = [d for d in dropped if d["step"] == "leakage"]
        assert [(d["where"], d["reason"]) for d in leaks] == [
            (f"{tmp_path}/data/eval.jsonl:1",
             f"contained in training row {tmp_path}/data/train.jsonl:1 (containment {int(value * 100) / 100:.2f})")]
        assert TICKET not in kept
        assert card["reasons"]["leakage"] == {"contained in a training row": 1}


def test_a_split_of_one_file_is_checked_as_an_eval_file_is(tmp_path):
    # Deduplication keeps both rows (they are not near duplicates); the time split then puts the
    # newest, the longer one, in eval, and it must not stay there.
    rows = _filler(5)
    for i, row in enumerate(rows):
        row["created"] = f"2024-01-{1 + i % 27:02d}"
    rows += [{"text": TICKET, "label": "billing", "created": "2023-06-01"},
             {"text": LONGER, "label": "billing", "created": "2024-12-31"}]
    for dropped, kept, card in _both_paths(tmp_path, rows, None, split={"by": "time", "time_field": "created"}):
        leaks = [d for d in dropped if d["step"] == "leakage"]
        assert [(d["where"], d["source"]) for d in leaks] == [(f"{tmp_path}/data/train.jsonl:{len(rows)}", "train")]
        assert "contains training row" in leaks[0]["reason"]
        assert LONGER not in kept and kept  # the other newest rows stay in eval
        assert card["dropped"]["leakage"] == {"train": 1, "eval": 0}


def test_different_tickets_on_the_same_topic_and_short_phrases_inside_long_rows_stay(tmp_path):
    train = _filler(6) + _rows([TICKET, *SAME_TOPIC[:2], INSIDE_SHORT])
    evaluation = _filler(7) + _rows([*SAME_TOPIC[2:], SHORT, TICKET + " thanks"])
    for dropped, kept, card in _both_paths(tmp_path, train, evaluation):
        # Only the one-word addition goes, and as a near duplicate: the containment rule adds nothing.
        assert [d["reason"].split(" of ")[0] for d in dropped if d["step"] == "leakage"] == ["near duplicate"]
        assert {*SAME_TOPIC[2:], SHORT} <= set(kept)


def test_containment_can_be_switched_off_and_the_key_is_validated(tmp_path):
    for dropped, kept, card in _both_paths(tmp_path, _filler(8) + _rows([TICKET]), _filler(9) + _rows([LONGER]),
                                           dedup={"containment": None}):
        assert LONGER in kept and not [d for d in dropped if d["step"] == "leakage"]
        assert card["dedup"]["containment"] is None
    recipe = tmp_path / "recipe.yaml"
    for bad in (0, 1.5, "most"):
        with pytest.raises(RecipeError, match="data.dedup.containment"):
            load_recipe(recipe, {"data.dedup.containment": bad})
    assert load_recipe(recipe, {"data.dedup": {}}).data.dedup.containment == dedup.CONTAINMENT == 0.9


def test_contained_leaks_names_the_earliest_training_row_and_which_way_it_overlaps():
    edited = LONGER.replace("yesterday", "today")
    train = [SAME_TOPIC[0], edited, LONGER, "Hi, where is my refund please?"]
    grown = TICKET + " " + SENTENCE + " Please hurry, it was a gift."
    evaluation = [TICKET, SAME_TOPIC[1], SHORT, grown]
    leaks = dedup.contained_leaks(train, evaluation)
    # Row 2 overlaps both fully, but row 1, earlier, already does by 0.9 or more.
    assert leaks == {0: (1, "contained in", _share(TICKET, edited)), 3: (1, "contains", _share(grown, edited))}
    assert dedup.contained_leaks(train, evaluation, threshold=0.99) == {0: (2, "contained in", 1.0),
                                                                        3: (2, "contains", 1.0)}
    # The short row is left alone because it is short: with a lower floor it is found.
    assert dedup.contained_leaks(train, evaluation, min_shingles=10)[2] == (3, "contained in", 1.0)
    with pytest.raises(ValueError, match="containment threshold"):
        dedup.contained_leaks(train, evaluation, threshold=0)
    assert dedup.containment_reason("contained in", "f.csv:3", 0.9999) == "contained in training row f.csv:3 (containment 0.99)"


def test_no_two_different_tickets_of_the_example_data_are_called_leaked():
    # The measurement behind CONTAINMENT and MIN_CONTAINED_SHINGLES: a pair the rule reports among
    # 720 real support tickets is a near duplicate already.
    with open(TICKETS, encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    half = len(texts) // 2
    for train, evaluation in ((texts[:half], texts[half:]), (texts[half:], texts[:half])):
        for row, (other, _, _) in dedup.contained_leaks(train, evaluation).items():
            assert jaccard(shingles(evaluation[row]), shingles(train[other])) >= 0.85


def _lengthened(seed: int, size: int) -> list[str]:
    """Tickets with copies grown by up to 25 words or cut to two thirds mixed in."""
    rng = np.random.default_rng(seed)
    texts = []
    for text in random_corpus(seed=seed, size=size):
        texts.append(text)
        words = text.split()
        if rng.random() < 0.25:
            texts.append(text + " " + " ".join(rng.choice(words, size=int(rng.integers(1, 26)))) + " extra")
        if rng.random() < 0.1:
            texts.append(" ".join(words[: max(1, 2 * len(words) // 3)]))
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize("block_rows", [1, 37, 100_000])
def test_the_compact_index_finds_what_memory_finds_and_each_pair_is_exact(block_rows):
    texts = _lengthened(seed=31, size=900)
    train, evaluation = texts[:900], texts[900:]
    expected = dedup.contained_leaks(train, evaluation)
    assert len(expected) > 50
    assert dedup_index.contained_leaks_compact(train, evaluation, block_rows=block_rows) == expected
    for row, (other, kind, value) in expected.items():
        assert value == _share(evaluation[row], train[other]) >= 0.9
        assert min(shingles(evaluation[row]).size, shingles(train[other]).size) >= dedup.MIN_CONTAINED_SHINGLES
        assert kind == ("contained in" if shingles(evaluation[row]).size <= shingles(train[other]).size else "contains")


def test_recall_on_rows_grown_by_up_to_half_their_length():
    texts = _lengthened(seed=32, size=1200)
    train, evaluation = texts[:1200], texts[1200:]
    found = dedup.contained_leaks(train, evaluation)
    sets = [set(shingles(t).tolist()) for t in train]
    missed = 0
    for row, text in enumerate(evaluation):
        mine = set(shingles(text).tolist())
        for theirs in sets:
            small, large = sorted((len(mine), len(theirs)))
            if small >= dedup.MIN_CONTAINED_SHINGLES and large <= 1.5 * small \
                    and len(mine & theirs) >= 0.9 * small:
                missed += row not in found
                break
    assert missed == 0


def test_the_store_deduplication_writes_serves_the_containment_search(tmp_path):
    # No file of its own: the shingle sets the near-duplicate pass confirms on are enough.
    store = dedup_index.FingerprintStore(tmp_path / "prints", 0.85)
    store.append(dedup_index.fingerprint([TICKET, ONE_WORD_CHANGED, LONGER], 0.85))
    store.close()
    told = []
    partner = dedup.find_contained(store, np.array([True, True, False]), np.array([False, False, True]),
                                   block_rows=1, on_rows=told.append)
    store.release()
    assert partner.tolist() == [-1, -1, 0]
    assert sum(told) == 2 * 3  # one pass over the rows each way
    written = sorted(p.name for p in (tmp_path / "prints").iterdir())
    assert written == ["bands.bin", "exact.bin", "sets.bin", "sizes.bin"]


def _tickets() -> list[str]:
    with open(TICKETS, encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def _document(start: int, ratio: float, head: str) -> str:
    """``head`` followed by tickets 60 to 399, from ``start`` on, until it has ``ratio`` times its shingles."""
    tickets, parts = _tickets()[60:400], [head]
    while shingles(" ".join(parts)).size < ratio * shingles(head).size:
        parts.append(tickets[start % len(tickets)])
        start += 1
    return " ".join(parts)


def _head(text: str, words: int = 40) -> str:
    return " ".join(text.split()[:words])


@pytest.mark.parametrize("ratio", [5, 10])
def test_an_eval_row_that_begins_a_much_longer_training_row_is_found_both_ways_round(ratio):
    # The realistic leaks: a question that is the first sentences of a long answer, a paragraph
    # cut from a long document. Their Jaccard is about 1 / ratio, far below any LSH banding's reach.
    tickets = _tickets()
    heads = [_head(" ".join(tickets[i : i + 3])) for i in range(0, 60, 3)]  # 20 passages of 40 words
    long_rows = [_document(17 * i, ratio, head) for i, head in enumerate(heads)]
    assert all(jaccard(shingles(h), shingles(d)) < 1.2 / ratio for h, d in zip(heads, long_rows))
    others, more = tickets[400:700], tickets[700:]  # unrelated rows on each side
    for train, evaluation, kind in ((others + long_rows, heads + more, "contained in"),
                                    (heads + others, more + long_rows, "contains")):
        expected = dedup.contained_leaks(train, evaluation)
        for leaks in (expected, dedup_index.contained_leaks_compact(train, evaluation, block_rows=7)):
            assert leaks == expected
            pairs = {row: other for row, (other, found_kind, value) in leaks.items() if found_kind == kind}
            if kind == "contained in":
                assert pairs == {i: len(others) + i for i in range(len(heads))}
            else:
                assert pairs == {len(more) + i: i for i in range(len(heads))}
            assert all(value == 1.0 for row, (_, _, value) in leaks.items() if row in pairs)


def test_a_row_just_below_the_threshold_stays():
    tickets = _tickets()
    long_row = _document(0, 5, _head(" ".join(tickets[10:13])))
    words = _head(long_row).split()
    value = 1.0
    for at in range(0, 40, 4):  # change words until the containment falls just below 0.9
        words[at] = "meanwhile"
        value = _share(" ".join(words), long_row)
        if value < dedup.CONTAINMENT:
            break
    row = " ".join(words)
    assert 0.85 <= value < dedup.CONTAINMENT
    train, evaluation = tickets[300:400] + [long_row], [row]
    assert dedup.contained_leaks(train, evaluation) == {}
    assert dedup_index.contained_leaks_compact(train, evaluation, block_rows=16) == {}
    # The threshold rules it out, not a missed candidate: just below its containment, it is found.
    assert dedup.contained_leaks(train, evaluation, threshold=value - 0.005) == {0: (100, "contained in", value)}


def test_the_hits_needed_follow_the_threshold():
    assert [dedup.required_hits(t) for t in (1.0, 0.95, 0.9, 0.8, 0.5)] == [8, 6, 5, 3, 1]
    for threshold in (0.5, 0.7, 0.9, 0.97, 1.0):
        hits = dedup.required_hits(threshold)
        found = lambda m: sum(math.comb(8, j) * threshold**j * (1 - threshold) ** (8 - j) for j in range(m, 9))
        assert found(hits) >= 0.99 - 1e-12 and (hits == 8 or found(hits + 1) < 0.99)


def test_templated_rows_are_searched_and_their_leaks_found():
    # Thousands of rows sharing most of their shingles: the posting lists are capped, the leaks still found.
    rng = np.random.default_rng(5)
    words = [f"w{i}x" for i in range(400)]
    preamble = ("Dear support team, I am writing about the issue described in my previous message, "
                "which is still not solved after several attempts on my side, and here are the details: ")
    tails = [" ".join(rng.choice(words, size=12)) for _ in range(3000)]
    train = [preamble + tail + " Thank you for your help, regards." for tail in tails]
    leaked = list(range(0, 3000, 10))
    fresh = [preamble + " ".join(rng.choice(words, size=12)) for _ in range(300)]
    evaluation = [preamble + tails[i] for i in leaked] + fresh
    leaks = dedup.contained_leaks(train, evaluation)
    assert dedup_index.contained_leaks_compact(train, evaluation, block_rows=500) == leaks
    for i, row in enumerate(leaked):
        assert leaks[i][:2] == (row, "contained in")
    assert len(leaks) == len(leaked)  # a fresh tail leaves a row at about 0.7
    for row, (other, _, value) in leaks.items():
        assert value == _share(evaluation[row], train[other]) >= 0.9


def test_an_update_drops_new_rows_that_overlap_an_earlier_eval_row_and_held_out_rows_that_overlap_training(tmp_path):
    from domaintune.data.examples import TextExample
    from domaintune.update.assemble import Ancestor, _seen_before

    version = Ancestor("m:1", tmp_path / "v1")
    write_jsonl(version.train, _rows([SAME_TOPIC[0], TICKET]))
    write_jsonl(version.eval, _rows([SAME_TOPIC[1]]))
    row = lambda text, origin: TextExample(text, "billing", meta={"origin": origin})
    fresh = [row(SAME_TOPIC[1] + " " + SENTENCE, "new.csv:2"),  # would leak a frozen eval row into training
             row(LONGER, "new.csv:3")]  # an earlier training row grown: learned again, not a leak
    fresh_eval = [row(SAME_TOPIC[0] + " " + SENTENCE, "new.csv:4")]  # production trained on it
    spec = load_recipe(write_recipe(tmp_path / "recipe.yaml", {"name": "m", "task": "classification",
                                                               "base_model": "minilm-l6", "data": {"train": "t.csv"}}))
    assert _seen_before(fresh, fresh_eval, [version], spec) == {"new.csv:2": "m:1, an eval row",
                                                                "new.csv:4": "m:1, a train row"}
    off = spec.model_copy(update={"data": spec.data.model_copy(update={"dedup": spec.data.dedup.model_copy(
        update={"containment": None})})})
    assert _seen_before(fresh, fresh_eval, [version], off) == {}


def test_an_eval_set_emptied_by_overlaps_says_which_key_drops_them(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", _filler(10) + _rows([TICKET]))
    write_jsonl(tmp_path / "data" / "eval.jsonl", _rows([LONGER]))
    recipe = write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": "classification", "base_model": "minilm-l6",
                                                     "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"}})
    spec = load_recipe(recipe)
    for run in (lambda: prepare(spec, tmp_path), lambda: prepare_streaming(spec, tmp_path, tmp_path / "out", workers=1)):
        with pytest.raises(DataError, match="0 eval rows are left") as info:
            run()
        assert "raise data.dedup.containment or set it to null" in info.value.hint


def test_the_recall_benchmark_finds_pairs_of_every_length_ratio():
    """bench/containment_recall.py on 20 pairs a case (its 300-pair table is in bench/README.md)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "containment_recall.py"
    done = subprocess.run([sys.executable, str(bench), "--pairs", "20"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert {row[0] for row in rows} == {"1", "1.5", "2", "3", "5", "10"} and len(rows) == 12
    # 20 pairs a case at containment >= 0.92: every one is found with probability > 0.99 each way.
    assert all(float(share.rstrip("%")) >= 90 for row in rows for share in row[2:4]), done.stdout
