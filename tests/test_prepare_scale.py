"""The streaming data steps (data.stream) against the in-memory ones (data.prepare): the same rows
kept and dropped for the same reasons, compact dedup equal to datasketch's, parallel equal to serial."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ticket_rows, write_csv, write_jsonl, write_recipe
from test_dedup import ONE_WORD_CHANGED, TICKET, random_corpus

from domaintune.data.array_split import group_mask, holdout_mask, time_mask
from domaintune.data.dedup import deduplicate
from domaintune.data.dedup_index import deduplicate_compact
from domaintune.data.prepare import prepare, prepare_recipe, write_prepared
from domaintune.data.stream import prepare_streaming
from domaintune.errors import DataError
from domaintune.recipe import load_recipe

PII = ["jane.doe@example.org", "4111 1111 1111 1111", "+44 20 7946 0958", "078-05-1120"]


def _tickets(seed: int = 0, n_per_label: int = 12) -> list[dict]:
    """Tickets with planted personal data, exact and near duplicates."""
    rows = ticket_rows(n_per_label, seed=seed)
    for i, value in enumerate(PII):
        rows[i]["text"] += f" contact {value}"
    rows.append(dict(rows[3], text=rows[3]["text"].upper() + " !"))  # exact after normalisation
    rows.append(dict(rows[5], label="other"))  # a duplicate with another label
    rows.append({"text": TICKET, "label": "billing", "channel": "chat"})
    rows.append({"text": ONE_WORD_CHANGED, "label": "billing", "channel": "chat"})
    return rows


def _with_bad_rows(path: Path) -> Path:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"text": "   ", "label": "billing"}) + "\n")
        fh.write(json.dumps({"text": "\u200b\x07", "label": "billing"}) + "\n")  # empty after cleaning
    return path


def _both(tmp_path: Path, data: dict, task: str = "classification", workers: int = 2):
    """(in-memory output dir, streaming output dir, spec)."""
    recipe = write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": task, "base_model": "minilm-l6", "data": data})
    spec = load_recipe(recipe)
    prepared = prepare(spec, tmp_path)
    write_prepared(prepared, tmp_path / "memory", quarantine=spec.data.on_bad_rows == "quarantine")
    prepare_streaming(spec, tmp_path, tmp_path / "stream", workers=workers)
    return tmp_path / "memory", tmp_path / "stream", spec


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def _card(directory: Path) -> dict:
    return json.loads((directory / "data_card.json").read_text(encoding="utf-8"))


def _accounted(card: dict) -> None:
    assert card["rows_in"] == card["dropped_total"] + card["kept"]["train"] + card["kept"]["eval"]
    assert card["dropped_total"] == sum(c["train"] + c["eval"] for c in card["dropped"].values())


def test_with_an_eval_file_streaming_keeps_and_drops_exactly_what_memory_does(tmp_path):
    train = _tickets(seed=1)
    evaluation = ticket_rows(4, seed=2) + [dict(train[7]), {"text": TICKET + " thanks", "label": "billing"},
                                           {"text": "hello there friend", "label": "greeting"}]
    _with_bad_rows(write_jsonl(tmp_path / "data" / "train.jsonl", train))
    write_jsonl(tmp_path / "data" / "eval.jsonl", evaluation)
    memory, stream, _ = _both(tmp_path, {"train": "data/train.jsonl", "eval": "data/eval.jsonl",
                                         "on_bad_rows": "quarantine"})
    for name in ("train.jsonl", "eval.jsonl"):
        assert _rows(stream / "data" / name) == _rows(memory / "data" / name)
    dropped = {q["where"]: q for q in _rows(memory / "data" / "quarantine.jsonl")}
    assert {q["where"]: q for q in _rows(stream / "data" / "quarantine.jsonl")} == dropped
    assert {q["step"] for q in dropped.values()} == {"validate", "clean", "dedup", "leakage", "labels"}
    expected, card = _card(memory), _card(stream)
    for key in ("rows_in", "dropped", "dropped_total", "reasons", "kept", "pii", "cleaning", "labels", "lengths"):
        assert card[key] == expected[key], key
    assert card["dedup"]["label_conflicts"] == expected["dedup"]["label_conflicts"] == 1
    assert card["dedup"]["label_conflicts_listed"] == expected["dedup"]["label_conflicts_listed"]
    [conflict] = card["dedup"]["label_conflicts_listed"]
    assert conflict["label"] == "other" and conflict["kept_label"] == train[5]["label"]
    assert dropped[conflict["where"]]["reason"].endswith(
        f"duplicate of {conflict['kept_where']}, whose label {train[5]['label']!r} was kept over this row's 'other'")
    assert not any(value in (stream / "data" / "train.jsonl").read_text() for value in PII)
    _accounted(card)


def test_the_random_split_holds_out_as_many_rows_of_each_label_as_memory_does(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", _tickets(seed=3, n_per_label=20))
    memory, stream, _ = _both(tmp_path, {"train": "data/train.jsonl"})
    kept = {side: _rows(stream / "data" / f"{side}.jsonl") for side in ("train", "eval")}
    expected = {side: _rows(memory / "data" / f"{side}.jsonl") for side in ("train", "eval")}
    where = lambda rows: sorted(r["where"] for r in rows)
    assert where(kept["train"] + kept["eval"]) == where(expected["train"] + expected["eval"])
    labels = lambda rows: Counter(r["label"] for r in rows)
    assert labels(kept["eval"]) == labels(expected["eval"])
    assert where(kept["eval"]) != where(expected["eval"])  # numpy's draw, not random's: documented
    assert _card(stream)["labels"] == _card(memory)["labels"]
    _accounted(_card(stream))


def test_group_and_time_splits_follow_their_rules_when_streaming(tmp_path):
    rows = ticket_rows(15, seed=4)
    for i, row in enumerate(rows):
        row["customer"] = f"c{i % 11}"
        row["created"] = f"2024-{1 + i % 12:02d}-{1 + i % 27:02d}"
    write_csv(tmp_path / "data" / "t.csv", rows)
    no_dedup = {"exact": False, "near": False}
    recipe = lambda split: write_recipe(tmp_path / "recipe.yaml", {
        "name": "t", "task": "classification", "base_model": "minilm-l6",
        "data": {"train": "data/t.csv", "split": split, "dedup": no_dedup}})

    recipe({"by": "group", "group_field": "customer"})
    out, _ = prepare_recipe(tmp_path / "recipe.yaml", output_dir=tmp_path / "g", streaming=True, workers=2)
    groups = {side: {r["customer"] for r in _rows(out / "data" / f"{side}.jsonl")} for side in ("train", "eval")}
    assert groups["eval"] and not groups["train"] & groups["eval"]

    recipe({"by": "time", "time_field": "created"})
    out, prepared = prepare_recipe(tmp_path / "recipe.yaml", output_dir=tmp_path / "t", streaming=True, workers=2)
    assert max(e.meta["created"] for e in prepared.train) < min(e.meta["created"] for e in prepared.eval)
    assert len(prepared.eval) >= round(len(rows) * 0.2)  # rows tied at the cut-off join eval
    written = {side: _rows(out / "data" / f"{side}.jsonl") for side in ("train", "eval")}
    line = lambda r: int(r["where"].rsplit(":", 1)[1])
    assert all(r["created"] == rows[line(r) - 2]["created"] for r in written["train"] + written["eval"])  # as written
    split = _card(out)["split"]
    assert split["train_until"] == max(r["created"] for r in written["train"])
    assert split["eval_from"] == min(r["created"] for r in written["eval"])
    memory = prepare(load_recipe(tmp_path / "recipe.yaml"), tmp_path).card["split"]
    assert (split["train_until"], split["eval_from"]) == (memory["train_until"], memory["eval_from"])


def test_parallel_workers_write_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr("domaintune.data.stream.CHUNK_ROWS", 7)  # many chunks, finishing out of order
    write_jsonl(tmp_path / "data" / "chat.jsonl", [
        {"prompt": f"order {i} for bob{i}@example.com, call +44 20 7946 09{i % 90:02d}", "completion": f"done {i}"}
        for i in range(120)] + [{"prompt": "order 3 for bob3@example.com", "completion": "done 3"}])
    recipe = write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": "sft", "base_model": "minilm-l6",
                                                     "data": {"train": "data/chat.jsonl"}})
    spec = load_recipe(recipe)
    outputs = []
    for workers in (1, 3):
        card, files = prepare_streaming(spec, tmp_path, tmp_path / f"w{workers}", workers=workers)
        outputs.append([f.read_bytes() for f in files])
        assert card["pii"]["rows_with_pii"] >= 120
    assert outputs[0] == outputs[1]
    assert b"@example.com" not in b"".join(outputs[0])


def test_error_mode_lists_the_first_bad_rows_and_writes_nothing(tmp_path):
    path = _with_bad_rows(write_jsonl(tmp_path / "data" / "train.jsonl", _tickets()))
    write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": "classification", "base_model": "minilm-l6",
                                            "data": {"train": "data/train.jsonl"}})
    with pytest.raises(DataError) as info:
        prepare_recipe(tmp_path / "recipe.yaml", output_dir=tmp_path / "out", streaming=True, workers=2)
    assert info.value.where == f"{path}:{len(_tickets()) + 1}"
    assert "not valid JSON" in str(info.value) and "2 more bad rows" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepare-")] == []


def test_large_inputs_switch_prepare_recipe_to_streaming(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data" / "train.jsonl", _tickets(seed=5))
    write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": "classification", "base_model": "minilm-l6",
                                            "data": {"train": "data/train.jsonl", "on_bad_rows": "quarantine"}})
    monkeypatch.setattr("domaintune.data.prepare.STREAM_FROM_BYTES", 1)
    out, prepared = prepare_recipe(tmp_path / "recipe.yaml", output_dir=tmp_path / "out")
    assert not isinstance(prepared.train, list)
    assert [e.where for e in prepared.train] == [r["where"] for r in _rows(out / "data" / "train.jsonl")]
    assert len(prepared.dropped) == prepared.card["dropped_total"] == len(list(prepared.dropped)) >= 3
    assert prepared.labels == sorted(prepared.card["labels"]["train"])
    _accounted(prepared.card)


@pytest.mark.parametrize("exact,near", [(True, True), (False, True), (True, False)])
def test_the_compact_index_decides_as_the_datasketch_one(exact, near):
    texts = random_corpus(seed=11, size=2500)
    train, evaluation = texts[:2000], texts[1800:]
    expected = deduplicate(train, evaluation, exact=exact, near=near)
    assert expected.train_duplicate_of and expected.eval_leaks
    assert deduplicate_compact(train, evaluation, exact=exact, near=near) == expected


def test_array_splits():
    labels = np.array([0] * 50 + [1] * 10 + [2])
    held = holdout_mask(len(labels), 0.2, seed=1, labels=labels)
    assert [int(held[labels == k].sum()) for k in (0, 1, 2)] == [10, 2, 0]
    assert not np.array_equal(held, holdout_mask(len(labels), 0.2, seed=2, labels=labels))

    groups = np.repeat(np.arange(20, dtype=float), 5)
    held = group_mask(groups, 0.3, seed=0)
    assert all(len(set(held[groups == g])) == 1 for g in range(20))
    assert 25 <= held.sum() <= 35

    times = np.array([1.0, 2, 3, 3, 3, 4, 5, 6, 7, 8])
    assert time_mask(times, 0.2).tolist() == [t >= 7 for t in times]
    assert time_mask(np.array([2.0, 1, 3, 3]), 0.25).tolist() == [False, False, True, True]
    assert not time_mask(np.ones(5), 0.2).any()


def test_splits_do_not_hold_out_most_rows_for_one_large_group_or_time():
    from domaintune.data.split import group_split, time_split

    # 45 rows of one customer, 15 of others: the big group trains, eval stays near 20%
    groups = np.array([0.0] * 45 + [float(g) for g in range(1, 16)])
    for seed in range(5):
        held = group_mask(groups, 0.2, seed=seed)
        train, evaluation = group_split(list(groups), 0.2, seed, group=lambda g: g)
        assert not held[:45].any() and 5 <= held.sum() <= 15
        assert 0 not in evaluation and 5 <= len(evaluation) <= 15
    # two groups, both far larger than the target: the smaller one is held out alone
    assert group_mask(np.array([0.0] * 45 + [1.0] * 15), 0.2, seed=0).sum() == 15
    assert group_split([0] * 45 + [1] * 15, 0.2, 0, group=lambda g: g)[1] == [1] * 15
    # 48 of 60 rows share the newest time: exactly the newest 12 (ties in file order) are held out
    times = np.array([float(t) for t in range(12)] + [99.0] * 48)
    assert time_mask(times, 0.2).tolist() == [False] * 48 + [True] * 12
    train, evaluation = time_split(list(range(60)), 0.2, time=lambda i: times[i])
    assert evaluation == list(range(48, 60))
    # ties at the cut-off go to train when that keeps eval nearer the fraction
    times = np.array([1.0] * 5 + [2.0] * 4 + [3.0])
    assert time_mask(times, 0.2).tolist() == [False] * 9 + [True]
    assert time_split(list(range(10)), 0.2, time=lambda i: times[i])[1] == [9]
