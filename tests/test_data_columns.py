"""The data steps on a row's other columns (redacted and written as JSON can hold them), on sft
system prompts (not what duplicates are judged on), and the recipe checks around them."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import ticket_rows, write_csv, write_jsonl, write_recipe

from domaintune.data.prepare import prepare_recipe
from domaintune.errors import RecipeError


def _written(directory: Path) -> list[dict]:
    return [json.loads(line) for name in ("train", "eval")
            for line in (directory / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("streaming", [False, True])
def test_personal_data_in_other_columns_is_redacted_and_a_group_column_still_groups(tmp_path, streaming):
    rows = ticket_rows(10)
    for i, row in enumerate(rows):
        row["customer"] = f"customer{i % 8}@example.com"
        row["notes"] = f"caller SSN 078-05-11{i % 10}0, phone +44 20 7946 09{i % 10}0"
    write_csv(tmp_path / "data" / "t.csv", rows)
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "t", "task": "classification", "base_model": "minilm-l6",
        "data": {"train": "data/t.csv", "split": {"by": "group", "group_field": "customer"},
                 "dedup": {"exact": False, "near": False}}})
    directory, prepared = prepare_recipe(recipe, output_dir=tmp_path / "out", streaming=streaming, workers=1)
    written = _written(directory)
    text = json.dumps(written)
    assert "@example.com" not in text and "078-05-11" not in text and "7946" not in text
    assert all(r["notes"].startswith("caller SSN [") for r in written)
    # eight customers, still eight groups, each on one side of the split
    sides: dict[str, set] = {}
    for name in ("train", "eval"):
        for line in (directory / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            sides.setdefault(json.loads(line)["customer"], set()).add(name)
    assert len(sides) == 8 and all(len(s) == 1 for s in sides.values())
    assert prepared.card["pii"]["found"]["email"] >= len(rows)


def test_a_long_system_prompt_does_not_make_rows_duplicates(tmp_path):
    rows = [{"prompt": f"what does code {i} mean", "completion": f"code {i} means outcome {i * 7}"} for i in range(20)]
    write_jsonl(tmp_path / "data" / "chat.jsonl", rows)
    system = "You are a careful assistant for the claims team. " * 25  # ~1,250 characters, shared by every row
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "t", "task": "sft", "base_model": "smollm2-135m-instruct",
        "data": {"train": "data/chat.jsonl", "system_prompt": system}})
    _, prepared = prepare_recipe(recipe, output_dir=tmp_path / "out", streaming=False)
    assert sum(prepared.card["dropped"]["dedup"].values()) == 0
    assert prepared.card["kept"]["train"] + prepared.card["kept"]["eval"] == 20
    assert all(e.messages[0] == {"role": "system", "content": system.strip()} for e in prepared.train)


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_dates_and_decimals_are_written_as_json(tmp_path, streaming):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = ticket_rows(5)
    table = pa.table({
        "text": [r["text"] for r in rows], "label": [r["label"] for r in rows],
        "created": [dt.datetime(2024, 5, 1 + i % 28, 14, 30) for i in range(len(rows))],
        "amount": pa.array([Decimal(f"{i}.50") for i in range(len(rows))], type=pa.decimal128(8, 2)),
    })
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "t.parquet")
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "t", "task": "classification", "base_model": "minilm-l6", "data": {"train": "data/t.parquet"}})
    directory, _ = prepare_recipe(recipe, output_dir=tmp_path / "out", streaming=streaming, workers=1)
    written = _written(directory)
    assert len(written) == len(rows)
    assert {r["created"][:8] for r in written} == {"2024-05-"} and all("T14:30" in r["created"] for r in written)
    assert sorted(r["amount"] for r in written) == sorted(i + 0.5 for i in range(len(rows)))


def test_a_split_that_an_eval_file_would_override_is_refused(tmp_path):
    write_csv(tmp_path / "data" / "train.csv", ticket_rows(5))
    write_csv(tmp_path / "data" / "eval.csv", ticket_rows(2, seed=1))
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "t", "task": "classification", "base_model": "minilm-l6",
        "data": {"train": "data/train.csv", "eval": "data/eval.csv", "split": {"by": "group", "group_field": "channel"}}})
    with pytest.raises(RecipeError, match="has no effect when data.eval"):
        prepare_recipe(recipe, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_a_recipe_error(tmp_path):
    write_csv(tmp_path / "data" / "t.csv", ticket_rows(5))
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "t", "task": "classification", "base_model": "minilm-l6", "data": {"train": "data/t.csv"}})
    with pytest.raises(RecipeError, match="is a file"):
        prepare_recipe(recipe, output_dir=tmp_path / "data" / "t.csv")


def test_inspect_shows_the_card_when_no_row_survives(tmp_path):
    from domaintune.data.inspect import inspect_data

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                               {"role": "robot", "content": "x"}]} for i in range(4)])
    card = inspect_data(path, task="sft")
    assert card["kept"] == {"train": 0, "eval": 0}
    assert card["dropped"]["validate"]["train"] == 4
    assert "unknown role 'robot'" in card["problems"][0]["reason"]


def test_inspect_rejects_an_unknown_task_and_bad_overrides_as_recipe_errors(tmp_path):
    from domaintune.data.inspect import inspect_data

    path = write_csv(tmp_path / "t.csv", ticket_rows(5))
    with pytest.raises(RecipeError, match="--task 'foo'"):
        inspect_data(path, task="foo")
    with pytest.raises(RecipeError, match=r"--set: data.dedup.threshold: Input should be a valid number"):
        inspect_data(path, overrides={"data.dedup.threshold": "abc"})


def test_inspecting_one_file_names_the_option_that_picks_a_column(tmp_path):
    from domaintune.data.inspect import inspect_data
    from domaintune.errors import DataError

    path = write_csv(tmp_path / "t.csv", [{"body": r["text"], "label": r["label"]} for r in ticket_rows(3)])
    with pytest.raises(DataError, match="no column 'text'") as missing:
        inspect_data(path, task="classification")
    assert missing.value.hint == "name the column with --text-field"  # a file has no recipe keys to set
    assert inspect_data(path, task="classification", text_field="body")["kept"]["train"] > 0


def test_an_update_s_provenance_columns_stay_as_written():
    """An update follows its rows by `origin` between its steps: a path is not personal data."""
    from domaintune.data.readers import Row
    from domaintune.data.steps import RowSteps, make_redactor
    from domaintune.recipe import Recipe

    spec = Recipe.model_validate({"name": "t", "task": "classification", "base_model": "minilm-l6",
                                  "data": {"train": "x.csv"}})
    origin = "/data/batch 07700 900123/new.csv:3"
    row = Row({"text": "refund please", "label": "billing", "origin": origin, "source": "new",
               "notes": "call me on 07700 900123"}, "x.csv:2")
    example = RowSteps(spec, "train", make_redactor(spec)).run(row).example
    assert example.meta["origin"] == origin and example.meta["source"] == "new"
    assert "900123" not in example.meta["notes"]
