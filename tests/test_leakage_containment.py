"""Leakage by containment: an eval row that is a training row plus a sentence (or the other way
round) stays below the near-duplicate threshold, yet the model has seen it. Such rows are dropped
from eval and reported as leakage, in memory and streaming, with an eval file and with a split."""

from __future__ import annotations

import csv
import json
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


def test_a_store_without_containment_bands_says_how_to_make_one(tmp_path):
    store = dedup_index.FingerprintStore(tmp_path / "prints", 0.85)
    store.append(dedup_index.fingerprint([TICKET, ONE_WORD_CHANGED], 0.85))
    store.close()
    with pytest.raises(ValueError, match="containment=True"):
        dedup.find_contained(store, np.array([True, False]), np.array([False, True]))
    store.release()


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
