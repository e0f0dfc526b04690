"""The data stage: validation modes, cleaning, PII, duplicates and leakage, splits, and counts that add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ticket_rows, write_csv, write_jsonl, write_recipe

from domaintune.data.prepare import prepare, write_prepared
from domaintune.errors import DataError
from domaintune.recipe import load_recipe


def _recipe(tmp_path: Path, data: dict, task: str = "classification") -> Path:
    return write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": task, "base_model": "minilm-l6", "data": data})


def _prepare(tmp_path: Path, data: dict, task: str = "classification", overrides: dict | None = None):
    path = _recipe(tmp_path, data, task)
    return prepare(load_recipe(path, overrides), tmp_path)


def _accounted(prepared) -> None:
    card = prepared.card
    assert card["rows_in"] == card["dropped_total"] + card["kept"]["train"] + card["kept"]["eval"]
    assert card["dropped_total"] == sum(c["train"] + c["eval"] for c in card["dropped"].values())
    assert card["kept"] == {"train": len(prepared.train), "eval": len(prepared.eval)}


def _tickets_with_bad_rows(tmp_path: Path) -> Path:
    rows = ticket_rows(10)
    path = write_csv(tmp_path / "data" / "tickets.csv", rows)
    lines = path.read_text().splitlines()
    lines.insert(3, "a row,with,too,many,fields")  # line 4
    lines.insert(6, ",billing,chat")  # line 7: empty text
    path.write_text("\n".join(lines) + "\n")
    with open(path, "ab") as fh:
        fh.write(b"caf\xe9 invoice,billing,chat\n")  # last line: not UTF-8
    return path


def test_error_mode_lists_the_first_bad_rows_with_file_and_line(tmp_path):
    path = _tickets_with_bad_rows(tmp_path)
    n_lines = len(path.read_bytes().splitlines())
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, {"train": "data/tickets.csv"})
    text = str(info.value)
    assert info.value.where == f"{path}:4"
    assert "5 fields but the header has 3" in text
    assert f"{path}:7: field 'text' is empty" in text
    assert f"{path}:{n_lines}: bytes" in text and "not UTF-8" in text
    assert "on_bad_rows" in info.value.hint


def test_skip_mode_drops_bad_rows_and_the_counts_add_up(tmp_path):
    _tickets_with_bad_rows(tmp_path)
    prepared = _prepare(tmp_path, {"train": "data/tickets.csv", "on_bad_rows": "skip",
                                   "dedup": {"exact": False, "near": False}})
    assert prepared.card["rows_in"] == 43
    assert prepared.card["dropped"]["validate"] == {"train": 3, "eval": 0}
    assert len(prepared.train) + len(prepared.eval) == 40
    _accounted(prepared)


def test_quarantine_writes_each_dropped_row_with_its_reason(tmp_path):
    path = _tickets_with_bad_rows(tmp_path)
    prepared = _prepare(tmp_path, {"train": "data/tickets.csv", "on_bad_rows": "quarantine"})
    files = write_prepared(prepared, tmp_path / "out", quarantine=True)
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "data" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == prepared.card["dropped_total"] >= 3
    wheres = {q["where"]: q for q in quarantined}
    assert "5 fields" in wheres[f"{path}:4"]["reason"] and wheres[f"{path}:4"]["step"] == "validate"
    assert {p.name for p in files} == {"train.jsonl", "eval.jsonl", "quarantine.jsonl"}
    card = json.loads((tmp_path / "out" / "data_card.json").read_text())
    assert [p["file"] for p in card["processed"]] == ["data/train.jsonl", "data/eval.jsonl", "data/quarantine.jsonl"]
    assert "# Data card" in (tmp_path / "out" / "data_card.md").read_text()


def test_cleaning_removes_control_characters_and_drops_rows_left_empty(tmp_path):
    rows = ticket_rows(5)
    rows[0]["text"] = "my\x00 invoice \u200b  is   wrong"
    rows[1]["text"] = "\x07\u200b"
    write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv", "on_bad_rows": "skip", "dedup": {"near": False}})
    texts = [e.text for e in prepared.train + prepared.eval]
    assert "my invoice is wrong" in texts
    assert prepared.card["dropped"]["clean"]["train"] == 1
    assert prepared.card["cleaning"]["rows_changed"] >= 1
    _accounted(prepared)


def test_pii_is_redacted_before_anything_else_sees_it(tmp_path):
    rows = ticket_rows(5)
    rows[0]["text"] = "refund to jane.doe@example.org please, card 4111 1111 1111 1111"
    write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv"})
    texts = " ".join(e.text for e in prepared.train + prepared.eval)
    assert "jane.doe@example.org" not in texts and "4111 1111 1111 1111" not in texts
    assert "[EMAIL]" in texts and "[CREDIT_CARD]" in texts
    assert prepared.card["pii"]["found"]["email"] == 1
    assert prepared.card["pii"]["rows_with_pii"] == 1


def test_pii_redaction_can_be_switched_off(tmp_path):
    rows = ticket_rows(5)
    rows[0]["text"] = "write to jane.doe@example.org"
    write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv", "pii": {"redact": False}})
    assert any("jane.doe@example.org" in e.text for e in prepared.train + prepared.eval)


def test_pseudonym_mode_needs_a_secret(tmp_path, monkeypatch):
    from domaintune.errors import RecipeError

    monkeypatch.delenv("DOMAINTUNE_PII_SECRET", raising=False)
    write_csv(tmp_path / "data" / "t.csv", ticket_rows(5))
    with pytest.raises(RecipeError, match="DOMAINTUNE_PII_SECRET"):
        _prepare(tmp_path, {"train": "data/t.csv", "pii": {"mode": "pseudonym"}})


def test_duplicates_in_train_are_dropped_keeping_the_first(tmp_path):
    rows = ticket_rows(5)
    rows.insert(7, dict(rows[2], text=rows[2]["text"].upper() + " !"))  # same after normalisation
    path = write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv"})
    reasons = [d for d in prepared.dropped if d.step == "dedup"]
    assert any(d.where == f"{path}:9" and d.reason == f"exact duplicate of {path}:4" for d in reasons)
    _accounted(prepared)


def test_a_duplicate_with_another_label_names_both_labels_and_the_card_lists_it(tmp_path):
    rows = ticket_rows(5)
    rows.insert(7, dict(rows[2], label="Shipping" if rows[2]["label"] != "shipping" else "Billing"))
    path = write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv"})
    kept, own = rows[2]["label"], rows[7]["label"]
    [dropped] = [d for d in prepared.dropped if d.where == f"{path}:9"]
    assert dropped.reason == f"exact duplicate of {path}:4, whose label {kept!r} was kept over this row's {own!r}"
    dedup = prepared.card["dedup"]
    assert dedup["label_conflicts"] == 1
    assert dedup["label_conflicts_listed"] == [{"where": f"{path}:9", "label": own, "kept_where": f"{path}:4",
                                                "kept_label": kept}]
    write_prepared(prepared, tmp_path / "out", quarantine=False)
    card_md = (tmp_path / "out" / "data_card.md").read_text(encoding="utf-8")
    assert f"- {path}:9 ({own!r}) duplicates {path}:4 ({kept!r}), which was kept" in card_md
    assert prepared.card["reasons"]["dedup"] == {"exact duplicate": 1}  # still counted as one kind of reason


def _labels_written_two_ways(tmp_path: Path) -> Path:
    rows = ticket_rows(6)
    billing = [r for r in rows if r["label"] == "billing"]
    shipping = [r for r in rows if r["label"] == "shipping"]
    billing[0]["label"] = billing[1]["label"] = "Billing"
    shipping[0]["label"] = " SHIPPING"  # surrounding spaces are stripped, case is kept
    for row in shipping[1:3]:
        row["label"] = "Shipping"
    return write_csv(tmp_path / "data" / "t.csv", rows)


def test_labels_differing_only_in_case_stay_apart_and_the_card_warns(tmp_path):
    _labels_written_two_ways(tmp_path)
    prepared = _prepare(tmp_path, {"train": "data/t.csv", "dedup": {"exact": False, "near": False}})
    assert {"Billing", "billing", "SHIPPING", "Shipping", "shipping"} <= set(prepared.labels)  # not merged
    assert prepared.card["label_variants"] == [{"Billing": 2, "billing": 4}, {"SHIPPING": 1, "Shipping": 2, "shipping": 3}]
    write_prepared(prepared, tmp_path / "out", quarantine=False)
    card_md = (tmp_path / "out" / "data_card.md").read_text(encoding="utf-8")
    assert "'Billing' (2 rows), 'billing' (4 rows); 'SHIPPING' (1 row)" in card_md
    assert "normalise the label column" in card_md
    assert json.loads((tmp_path / "out" / "data_card.json").read_text())["label_variants"][0] == {"Billing": 2,
                                                                                                   "billing": 4}


def test_labels_written_one_way_give_no_warning(tmp_path):
    write_csv(tmp_path / "data" / "t.csv", ticket_rows(5))
    prepared = _prepare(tmp_path, {"train": "data/t.csv"})
    assert prepared.card["label_variants"] == []
    write_prepared(prepared, tmp_path / "out", quarantine=False)
    assert "case or spacing" not in (tmp_path / "out" / "data_card.md").read_text(encoding="utf-8")


def test_cli_data_inspect_and_prepare_warn_of_labels_differing_only_in_case(tmp_path):
    from typer.testing import CliRunner

    from domaintune.cli import app

    path = _labels_written_two_ways(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["data", "inspect", str(path)], env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    assert "warning: labels that differ only in case or spacing" in done.output
    assert "'Billing' (2 rows), 'billing' (4 rows)" in done.output and "normalise the label column" in done.output
    recipe = _recipe(tmp_path, {"train": "data/t.csv"})
    done = runner.invoke(app, ["data", "prepare", str(recipe), "-o", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    assert "labels that differ only in case or spacing" in done.output


def test_eval_rows_leaked_from_train_are_removed_and_reported(tmp_path):
    train = ticket_rows(10, seed=1)
    leaked = dict(train[3])
    eval_rows = [leaked] + [r for r in ticket_rows(3, seed=2)]
    write_csv(tmp_path / "data" / "train.csv", train)
    eval_path = write_csv(tmp_path / "data" / "eval.csv", eval_rows)
    prepared = _prepare(tmp_path, {"train": "data/train.csv", "eval": "data/eval.csv"})
    leaks = [d for d in prepared.dropped if d.step == "leakage"]
    assert [d.where for d in leaks][:1] == [f"{eval_path}:2"]
    assert leaked["text"] not in {e.text for e in prepared.eval}
    assert prepared.card["dedup"]["leaks"][0]["where"] == f"{eval_path}:2"
    _accounted(prepared)


def test_group_split_keeps_each_group_on_one_side(tmp_path):
    rows = ticket_rows(10)
    for i, row in enumerate(rows):
        row["customer"] = f"c{i % 9}"
    write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv", "split": {"by": "group", "group_field": "customer"},
                                   "dedup": {"exact": False, "near": False}})
    train_groups = {e.meta["customer"] for e in prepared.train}
    eval_groups = {e.meta["customer"] for e in prepared.eval}
    assert eval_groups and not train_groups & eval_groups
    assert 0.1 <= len(prepared.eval) / 40 <= 0.35


def test_time_split_evaluates_on_the_newest_rows(tmp_path):
    rows = ticket_rows(10)
    for i, row in enumerate(rows):
        row["created"] = f"2024-{1 + i % 12:02d}-{1 + i % 27:02d}"
    write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv", "split": {"by": "time", "time_field": "created"},
                                   "dedup": {"exact": False, "near": False}})
    assert max(e.meta["created"] for e in prepared.train) < min(e.meta["created"] for e in prepared.eval)


def test_time_split_writes_the_dates_as_they_were_and_the_card_states_the_cut_off(tmp_path):
    rows = ticket_rows(5)
    for i, row in enumerate(rows):
        row["visit_date"] = f"2024-06-{1 + i:02d}"
    rows[-1]["visit_date"] = "2024-06-30T14:00:00Z"
    write_csv(tmp_path / "data" / "t.csv", rows)
    prepared = _prepare(tmp_path, {"train": "data/t.csv", "split": {"by": "time", "time_field": "visit_date"},
                                   "dedup": {"exact": False, "near": False}})
    write_prepared(prepared, tmp_path / "out", quarantine=False)
    written = {side: [json.loads(line) for line in (tmp_path / "out" / "data" / f"{side}.jsonl").read_text().splitlines()]
               for side in ("train", "eval")}
    for row in written["train"] + written["eval"]:  # as written in the file (line 2 is rows[0]), not epoch seconds
        assert row["visit_date"] == rows[int(row["where"].rsplit(":", 1)[1]) - 2]["visit_date"]
    split = prepared.card["split"]
    assert split["time_field"] == "visit_date"
    assert split["train_until"] == max(r["visit_date"] for r in written["train"]) == "2024-06-16"
    assert split["eval_from"] == min(r["visit_date"] for r in written["eval"]) == "2024-06-17"
    card_md = (tmp_path / "out" / "data_card.md").read_text(encoding="utf-8")
    assert "Training rows have `visit_date` up to 2024-06-16; eval rows from 2024-06-17." in card_md


def test_time_split_rejects_a_value_that_is_not_a_date(tmp_path):
    rows = ticket_rows(3)
    for row in rows:
        row["created"] = "2024-05-01"
    rows[4]["created"] = "last tuesday"
    path = write_csv(tmp_path / "data" / "t.csv", rows)
    with pytest.raises(DataError, match="not a date") as info:
        _prepare(tmp_path, {"train": "data/t.csv", "split": {"by": "time", "time_field": "created"}})
    assert info.value.where == f"{path}:6"


def test_split_by_group_without_its_field_is_a_recipe_error(tmp_path):
    from domaintune.errors import RecipeError

    write_csv(tmp_path / "data" / "t.csv", ticket_rows(3))
    with pytest.raises(RecipeError, match="group_field"):
        _prepare(tmp_path, {"train": "data/t.csv", "split": {"by": "group"}})


def test_label_only_in_eval_is_dropped_in_skip_mode(tmp_path):
    write_csv(tmp_path / "data" / "train.csv", ticket_rows(5))
    eval_path = write_csv(tmp_path / "data" / "eval.csv", [{"text": "my invoice", "label": "billing", "channel": "c"},
                                                            {"text": "hello there", "label": "greeting", "channel": "c"}])
    prepared = _prepare(tmp_path, {"train": "data/train.csv", "eval": "data/eval.csv", "on_bad_rows": "skip"})
    assert [(d.where, d.step) for d in prepared.dropped if d.step == "labels"] == [(f"{eval_path}:3", "labels")]
    assert {e.label for e in prepared.eval} == {"billing"}
    _accounted(prepared)


def test_old_eval_fraction_key_still_works(tmp_path):
    write_csv(tmp_path / "data" / "t.csv", ticket_rows(10))
    spec = load_recipe(_recipe(tmp_path, {"train": "data/t.csv", "eval_fraction": 0.5}))
    assert spec.data.split.eval_fraction == 0.5


def test_sft_rows_are_cleaned_redacted_and_deduplicated_as_conversations(tmp_path):
    rows = [{"prompt": f"question {i} from bob@example.com about item {i}", "completion": f"answer {i}"} for i in range(20)]
    rows.append(dict(rows[0]))
    write_jsonl(tmp_path / "data" / "chat.jsonl", rows)
    prepared = _prepare(tmp_path, {"train": "data/chat.jsonl"}, task="sft")
    contents = [m["content"] for e in prepared.train + prepared.eval for m in e.messages]
    assert not any("bob@example.com" in c for c in contents)
    assert prepared.card["dropped"]["dedup"]["train"] >= 1
    _accounted(prepared)


PLANTED = ["amelia.watts@northwind-mail.com", "+44 20 7946 0958", "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32",
           "078-05-1120", "192.168.14.201"]


def test_a_run_trains_and_evaluates_on_data_without_the_planted_pii(classification_recipe, tmp_path):
    from domaintune import run

    rows = ticket_rows()
    for i, value in enumerate(PLANTED):
        rows[i]["text"] = f"{rows[i]['text']} contact {value} thanks"
        rows[len(rows) - 1 - i]["text"] = f"please check {value} {rows[len(rows) - 1 - i]['text']}"
    write_csv(classification_recipe.parent / "data" / "tickets.csv", rows)
    result = run(classification_recipe, output_dir=tmp_path / "runs")
    seen = "".join((result.run_dir / name).read_text() for name in
                   ("data/train.jsonl", "data/eval.jsonl", "predictions.jsonl", "report.html", "data_card.md"))
    assert not [value for value in PLANTED if value in seen]
    card = json.loads((result.run_dir / "data_card.json").read_text())
    assert sum(card["pii"]["found"].values()) >= 2 * len(PLANTED)
    lineage = json.loads((result.run_dir / "lineage.json").read_text())
    assert [p["file"] for p in lineage["processed_data"]] == ["data/train.jsonl", "data/eval.jsonl"]


def test_cli_data_inspect_json_and_prepare(tmp_path):
    from typer.testing import CliRunner

    from domaintune.cli import app

    rows = ticket_rows(10)
    rows[0]["text"] += " mail me at jo@example.com"
    rows.append(dict(rows[1]))
    write_csv(tmp_path / "data" / "t.csv", rows)
    recipe = _recipe(tmp_path, {"train": "data/t.csv"})
    runner = CliRunner()
    done = runner.invoke(app, ["data", "inspect", str(tmp_path / "data" / "t.csv"), "--json"])
    assert done.exit_code == 0, done.output
    card = json.loads(done.output)
    assert card["task"] == "classification" and card["rows_in"] == 41
    assert card["pii"]["found"]["email"] == 1 and card["dropped"]["dedup"]["train"] == 1
    assert card["schema"]["t.csv"] == {"text": "str", "label": "str", "channel": "str"}

    done = runner.invoke(app, ["data", "inspect", str(recipe), "--tokenizer", "none-such-model"])
    assert done.exit_code == 0, done.output
    assert "41 rows in" in done.output and "no token counts" in done.output

    done = runner.invoke(app, ["data", "prepare", str(recipe), "-o", str(tmp_path / "prepared")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "prepared" / "data" / "train.jsonl").is_file()
    assert "jo@example.com" not in (tmp_path / "prepared" / "data" / "train.jsonl").read_text() + \
        (tmp_path / "prepared" / "data" / "eval.jsonl").read_text()
    assert (tmp_path / "prepared" / "data_card.md").is_file()
