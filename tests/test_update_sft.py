"""Continual updates of an sft model: version 1 answers the colour questions; new rows teach the
colour of a thing it never saw. The update starts from production's adapter, is compared with
production on version 1's frozen eval set and on the new rows, and its fate in the registry
follows the gates recorded in update.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from conftest import colour_rows, colours_in_production, in_production, write_jsonl, write_recipe
from typer.testing import CliRunner

from domaintune.cli.update import update as update_command
from domaintune.evaluate.gates import check_gate
from domaintune.registry.store import Registry
from domaintune.serve.feedback import FeedbackStore, Response, chat_prompt
from domaintune.update.updater import update

NAME = "tiny-colours"
NEW_QUESTION = {"prompt": "what is the colour of parcel ?", "completion": "black ."}


@pytest.fixture(scope="module")
def production(tmp_path_factory, tiny_llama):
    """Version 1 in production, trained on the colour questions; returns (its run dir, a registry file)."""
    return colours_in_production(tmp_path_factory.mktemp("v1"), tiny_llama, epochs=6)


@pytest.fixture()
def registry_url(production, tmp_path):
    """A registry of this test's own, starting with version 1 in production."""
    shutil.copy(production[1], tmp_path / "registry.db")
    return f"sqlite:///{tmp_path / 'registry.db'}"


def new_rows(tmp_path):
    """The new question many times over, with a few of the old ones."""
    return write_jsonl(tmp_path / "new.jsonl", [NEW_QUESTION] * 24 + colour_rows(8, seed=3))


def comparisons(record):
    return {c["eval_set"]: c for c in record["comparisons"]}


def assert_fate_follows_the_recorded_gates(record, registry_url):
    """Every recorded gate re-checks to the same verdict on the recorded numbers, and the
    registry did what the verdict says."""
    for c in record["comparisons"]:
        assert set(c["intervals"]) == {"exact_match", "rouge_l"}  # perplexity has no per-row interval
        for metric, interval in c["intervals"].items():
            low, high = interval["difference"]
            assert low <= c["candidate"][metric] - c["production"][metric] <= high
        compared = {"base": c["production"], "tuned": c["candidate"], "intervals": c["intervals"]}
        for g in c["gates"]:
            assert check_gate(g["expr"], compared).passed == g["passed"], g
    held = all(g["passed"] for c in record["comparisons"] for g in c["gates"])
    assert record["passed"] == held and bool(record["failing"]) == (not held)
    assert record["stage"] == ("production" if held else "archived")
    with Registry(registry_url) as registry:
        assert registry.get(NAME, 2).stage == record["stage"]
        assert registry.get(NAME, "production").version == (2 if held else 1)


def test_an_sft_update_learns_a_new_answer(registry_url, production, tmp_path):
    # 15 frozen eval rows give wide intervals: the earlier-set gate allows what the toy can show
    result = update(NAME, [new_rows(tmp_path)], registry_url=registry_url, output_dir=tmp_path / "updates",
                    replay_ratio=1.0, tolerance=0.5)

    record = json.loads((result.run_dir / "update.json").read_text())
    sets = comparisons(record)
    assert set(sets) == {f"{NAME}:1", "new rows"}
    frozen = production[0] / "data" / "eval.jsonl"
    assert Path(sets[f"{NAME}:1"]["file"]) == frozen
    assert sets[f"{NAME}:1"]["eval_rows"] == len(frozen.read_text().splitlines())
    new = sets["new rows"]
    assert new["production"]["exact_match"] == 0  # production never saw the new answer
    assert new["candidate"]["exact_match"] > 0.5
    assert new["candidate"]["perplexity"] < new["production"]["perplexity"]
    assert result.assembly.train_rows["replay"] > 0
    assert_fate_follows_the_recorded_gates(record, registry_url)
    assert result.stage == "production"


def test_an_sft_update_that_learns_nothing_starts_from_production_and_is_rejected(registry_url, production, tmp_path):
    # The default gate on new rows is "no worse", which a candidate equal to production meets:
    # asking for better is what rejects one that learned nothing.
    result = update(NAME, [new_rows(tmp_path)], registry_url=registry_url, output_dir=tmp_path / "updates",
                    learning_rate=1e-9, epochs=1, gate_new="difference.exact_match > 0")

    record = json.loads((result.run_dir / "update.json").read_text())
    earlier, new = comparisons(record)[f"{NAME}:1"], comparisons(record)["new rows"]
    # Started from production's adapter, not a fresh one: the same answers, nearly the same perplexity.
    for c in (earlier, new):
        assert c["candidate"]["exact_match"] == c["production"]["exact_match"]
        assert c["candidate"]["perplexity"] == pytest.approx(c["production"]["perplexity"], rel=1e-3)
    assert earlier["candidate"]["perplexity"] < 0.9 * earlier["base"]["perplexity"]
    assert_fate_follows_the_recorded_gates(record, registry_url)
    assert [g["passed"] for g in earlier["gates"]] == [True]  # nothing forgotten,
    assert [g["passed"] for g in new["gates"]] == [False]  # but nothing learned either
    assert result.stage == "archived"


def test_feedback_that_repeats_production_eval_rows_stops_before_training(tiny_llama, tmp_path_factory, tmp_path):
    # The corrections were all dropped as repeats of production's frozen eval rows: the dry run
    # showed no training rows and passed, the real run trained on an empty file and failed late,
    # leaving the update's folder behind.
    root = tmp_path_factory.mktemp("deduplicated")
    write_jsonl(root / "data" / "colours.jsonl", colour_rows())
    recipe = write_recipe(root / "recipe.yaml", {
        "name": "unique-colours", "task": "sft", "base_model": str(tiny_llama), "method": "lora",
        "data": {"train": "data/colours.jsonl", "eval_fraction": 0.25, "dedup": {"near": False}},
        "training": {"epochs": 1, "learning_rate": 1e-2, "batch_size": 8, "max_seq_length": 64},
        "evaluate": {"max_new_tokens": 4},
    })
    run_dir, db = in_production(recipe, "unique-colours", root)
    frozen = [json.loads(line) for line in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    store = FeedbackStore(tmp_path / "feedback.db")
    for i, row in enumerate(frozen):
        store.add(f"r-{i}", Response("unique-colours", chat_prompt(row["messages"][:-1]), "blue ."),
                  correction=row["messages"][-1]["content"])
    store.close()
    app = typer.Typer()
    app.command()(update_command)
    args = ["unique-colours", "--feedback", "--feedback-db", str(tmp_path / "feedback.db"),
            "--registry-url", f"sqlite:///{db}", "--output-dir", str(tmp_path / "runs")]

    for extra in (["--dry-run"], []):
        outcome = CliRunner().invoke(app, args + extra)
        assert outcome.exit_code == 2, outcome.output
        assert "nothing new to train on" in outcome.output
        assert f"{len(frozen)} feedback record" in outcome.output or "one feedback record" in outcome.output
        assert "earlier version" in outcome.output and "or --feedback" not in outcome.output
    assert not (tmp_path / "runs").exists()
    with Registry(f"sqlite:///{db}") as registry:
        assert [v.version for v in registry.list("unique-colours")] == [1]
