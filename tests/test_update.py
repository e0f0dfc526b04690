"""Continual updates on a drifting ticket task: version 1 knows three intents; new rows bring a
fourth. The update must learn it and keep the old ones, a shuffled-label update must be
rejected, server feedback must reach the next version, and replay must reduce forgetting."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import typer
from conftest import in_production, ticket_rows, write_csv, write_recipe
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from domaintune.errors import DataError
from domaintune.cli.update import update as update_command
from domaintune.registry.store import Registry
from domaintune.update.updater import update

NAME = "drift-intents"
OLD = ("account", "billing", "shipping")
runner = CliRunner()


@pytest.fixture(scope="module")
def production(tmp_path_factory, tiny_bert):
    """Version 1 in production, trained on the three old intents; returns (its run dir, a registry file)."""
    root = tmp_path_factory.mktemp("v1")
    write_csv(root / "data" / "tickets.csv", [r for r in ticket_rows(50, seed=0) if r["label"] in OLD])
    recipe = write_recipe(root / "recipe.yaml", {
        "name": NAME, "task": "classification", "base_model": str(tiny_bert), "method": "lora",
        "data": {"train": "data/tickets.csv"},
        "training": {"epochs": 10, "learning_rate": 1e-2, "batch_size": 16, "max_seq_length": 32},
    })
    return in_production(recipe, NAME, root)


@pytest.fixture()
def registry_url(production, tmp_path):
    """A registry of this test's own, starting with version 1 in production."""
    shutil.copy(production[1], tmp_path / "registry.db")
    return f"sqlite:///{tmp_path / 'registry.db'}"


def new_rows(tmp_path, labels=("account", "billing", "shipping", "product"), per_label=40, old_per_label=10,
             shuffle=False):
    rows = [r for r in ticket_rows(per_label, seed=7) if r["label"] in labels]
    rows = [r for r in rows if r["label"] == "product"] + [r for r in rows if r["label"] != "product"][:old_per_label * 3]
    if shuffle:
        labels_drawn = [r["label"] for r in rows]
        random.Random(0).shuffle(labels_drawn)
        rows = [{**r, "label": label} for r, label in zip(rows, labels_drawn)]
    return write_csv(tmp_path / "new.csv", rows)


def old_set(result):
    return next(c for c in result.comparisons if c["eval_set"] == f"{NAME}:1")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_update_learns_a_new_label_and_keeps_the_old_ones(registry_url, tmp_path):
    result = update(NAME, [new_rows(tmp_path)], registry_url=registry_url, output_dir=tmp_path / "runs",
                    replay_ratio=1.0, tolerance=0.15)

    new = next(c for c in result.comparisons if c["eval_set"] == "new rows")
    assert new["production"]["per_label"]["product"]["recall"] == 0  # production never saw the label
    assert new["candidate"]["per_label"]["product"]["recall"] >= 0.5
    old = old_set(result)
    assert old["intervals"]["accuracy"]["difference"][0] >= -0.15
    assert result.passed and result.stage == "production"
    with Registry(registry_url) as registry:
        assert registry.get(NAME, "production").version == 2

    sources = {row["source"] for row in read_jsonl(result.run_dir / "data" / "train.jsonl")}
    assert sources == {"new", "replay"}
    record = json.loads((result.run_dir / "update.json").read_text())
    assert record["parent"] == f"{NAME}:1" and record["ancestors"][0]["ref"] == f"{NAME}:1"
    assert "| new rows |" in (result.run_dir / "update_report.md").read_text()


def test_shuffled_labels_are_rejected_and_production_is_unchanged(registry_url, tmp_path):
    app = typer.Typer()
    app.command()(update_command)
    outcome = runner.invoke(app, [NAME, "--data", str(new_rows(tmp_path, shuffle=True)), "--registry-url", registry_url,
                                  "--output-dir", str(tmp_path / "runs"), "--quiet"])

    assert outcome.exit_code == 3, outcome.output
    with Registry(registry_url) as registry:
        assert registry.get(NAME, "production").version == 1
        rejected = registry.get(NAME, 2)
        assert rejected.stage == "archived"
        entry = registry.audit(f"{NAME}:2")[-1]
    assert entry.details["to"] == "archived"
    assert entry.reason.startswith("rejected by the update gate") and "difference.accuracy" in entry.reason


def test_dry_run_reports_the_data_and_trains_nothing(registry_url, production, tmp_path):
    seen = read_jsonl(production[0] / "data" / "train.jsonl")[:3]  # already learned by version 1
    rows = [{"text": r["text"], "label": r["label"], "channel": "chat"} for r in seen]
    rows += [{"text": "my parcel is broken write to ana@example.com", "label": "product", "channel": "email"}]
    rows += [{"text": f"the manual is broken {w} again", "label": "product", "channel": "chat"} for w in ("today", "please")]
    data = write_csv(tmp_path / "new.csv", rows)
    app = typer.Typer()
    app.command()(update_command)

    outcome = runner.invoke(app, [NAME, "--data", str(data), "--dry-run", "--registry-url", registry_url,
                                  "--output-dir", str(tmp_path / "runs"), "--json"])

    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(outcome.output)["data"]
    assert summary["earlier_duplicates_dropped"] == 3
    assert summary["pii_found"] == {"email": 1}
    assert summary["train_rows"]["new"] + summary["eval_rows"] == 3
    assert not (tmp_path / "runs").exists()
    with Registry(registry_url) as registry:
        assert [v.version for v in registry.list(NAME)] == [1]


def test_feedback_corrections_flow_into_the_next_version(registry_url, production, tmp_path):
    from domaintune.serve.app import ServeConfig, create_app

    feedback_db = tmp_path / "feedback.db"
    with TestClient(create_app(ServeConfig(models={NAME: production[0]}, feedback_db=feedback_db))) as client:
        answered = client.post("/v1/classify", json={"model": NAME, "input": "warranty card is broken urgent"}).json()
        corrected = client.post("/v1/feedback", json={"response_id": answered["id"], "correction": "product",
                                                      "reviewer": "ana"}).json()
        client.post("/v1/feedback", json={"response_id": answered["id"], "rating": 5})

    result = update(NAME, [new_rows(tmp_path)], feedback=True, feedback_db=feedback_db, registry_url=registry_url,
                    output_dir=tmp_path / "runs", gate="tuned.accuracy >= 0", gate_new="tuned.accuracy >= 0")

    rows = [r for r in read_jsonl(result.run_dir / "data" / "train.jsonl") if r["source"].startswith("feedback:")]
    assert [(r["source"], r["reviewer"], r["text"], r["label"]) for r in rows] == [
        (f"feedback:{corrected['id']}", "ana", "warranty card is broken urgent", "product")]
    assert result.assembly.feedback_skipped == {"no correction": 1}
    assert result.stage == "production"

    with pytest.raises(DataError, match="nothing new to train on"):  # version 2 learned it: not again
        update(NAME, feedback=True, feedback_db=feedback_db, registry_url=registry_url, dry_run=True)


def test_replay_reduces_forgetting(registry_url, tmp_path):
    data = new_rows(tmp_path, labels=("shipping", "product"), old_per_label=5)
    forgetting = {}
    for ratio in (0.0, 1.0):
        result = update(NAME, [data], registry_url=registry_url, output_dir=tmp_path / f"runs-{ratio}",
                        replay_ratio=ratio, promote=False)
        old = old_set(result)
        forgetting[ratio] = old["candidate"]["accuracy"] - old["production"]["accuracy"]
        assert (result.assembly.train_rows.get("replay", 0) > 0) == (ratio > 0)
    assert forgetting[1.0] > forgetting[0.0] + 0.1, forgetting
