"""Continuous updates: a watched folder collects data files (and the server's corrections) and an
update runs on exactly the new ones once enough rows have arrived, each batch taken once."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from conftest import in_production, ticket_rows, write_csv, write_jsonl, write_recipe
from typer.testing import CliRunner

from domaintune.cli.update import update as update_command
from domaintune.errors import DomaintuneError
from domaintune.registry.store import Registry
from domaintune.serve.feedback import FeedbackStore, Response
from domaintune.update.watch import STATE, Watcher

NAME = "watched-intents"
ALWAYS = "tuned.accuracy >= 0"  # the gate outcome is not what these tests are about
NEVER = "tuned.accuracy > 1"
runner = CliRunner()


@pytest.fixture(scope="module")
def production(tmp_path_factory, tiny_bert):
    """Version 1 in production, trained as briefly as possible; returns (its run dir, a registry file)."""
    root = tmp_path_factory.mktemp("v1")
    write_csv(root / "data" / "tickets.csv", ticket_rows(6, seed=0))
    recipe = write_recipe(root / "recipe.yaml", {
        "name": NAME, "task": "classification", "base_model": str(tiny_bert), "method": "lora",
        "data": {"train": "data/tickets.csv"},
        "training": {"epochs": 1, "learning_rate": 1e-2, "batch_size": 16, "max_seq_length": 32},
        "evaluate": {"bias_probes": False, "explain_rows": 0},
    })
    return in_production(recipe, NAME, root)


@pytest.fixture()
def registry_url(production, tmp_path):
    shutil.copy(production[1], tmp_path / "registry.db")
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture()
def inbox(tmp_path):
    (tmp_path / "inbox").mkdir()
    return tmp_path / "inbox"


def cli(*args: str):
    app = typer.Typer()
    app.command()(update_command)
    return runner.invoke(app, [NAME, *args])


def state(inbox):
    return json.loads((inbox / STATE).read_text())


def versions(registry_url):
    with Registry(registry_url) as registry:
        return {v.version: v.stage for v in registry.list(NAME)}


def test_below_min_rows_nothing_runs_and_the_state_says_what_waits(inbox, tmp_path):
    write_csv(inbox / "a.csv", ticket_rows(3, seed=1))  # 12 rows
    (inbox / "broken.jsonl").write_text('{"text": "hello", "label": "account"}\nnot json\n')
    (inbox / "notes.txt.part").write_text("still being uploaded")
    # No registry, no model: nothing may need one while rows are only being counted.
    with Watcher(NAME, inbox, min_rows=20, registry_url=f"sqlite:///{tmp_path / 'none.db'}") as watcher:
        first = watcher.poll()
        second = watcher.poll()

    assert first.settling == ["a.csv", "broken.jsonl"] and first.waiting_rows == 0
    assert second.files == {"a.csv": 12} and second.waiting_rows == 12 and second.update is None
    assert list(second.set_aside) == ["broken.jsonl"] and "not valid JSON" in second.set_aside["broken.jsonl"]
    saved = state(inbox)
    assert saved["waiting"]["rows"] == 12 and saved["waiting"]["files"] == {"a.csv": 12}
    assert saved["updates"] == [] and "a.csv" not in saved["taken"]
    assert "not valid JSON" in saved["taken"]["broken.jsonl"]["set_aside"]
    assert not (tmp_path / "none.db").exists()


def test_a_half_written_file_is_not_taken(inbox):
    rows = ticket_rows(5, seed=2)  # 20 rows
    write_jsonl(inbox / "growing.jsonl", rows[:7])
    with Watcher(NAME, inbox, min_rows=1000) as watcher:
        assert watcher.poll().settling == ["growing.jsonl"]
        write_jsonl(inbox / "growing.jsonl", rows)  # the writer was not done: size and time change
        assert watcher.poll().settling == ["growing.jsonl"]
        settled = watcher.poll()

    assert settled.settling == [] and settled.files == {"growing.jsonl": 20}


def test_enough_rows_update_on_exactly_the_new_files_once(inbox, registry_url, tmp_path):
    write_csv(inbox / "a.csv", ticket_rows(3, seed=3))
    write_jsonl(inbox / "b.jsonl", ticket_rows(3, seed=4))
    with Watcher(NAME, inbox, min_rows=20, registry_url=registry_url, output_dir=tmp_path / "runs",
                 gate=ALWAYS, gate_new=ALWAYS) as watcher:
        assert watcher.poll().update is None  # both only just seen
        write_csv(inbox / "c.csv", ticket_rows(2, seed=5))  # arrives during the poll that updates
        updated = watcher.poll()

        shutil.copy(inbox / "a.csv", inbox / "a-again.csv")
        watcher.poll()
        after = watcher.poll()

    assert updated.update["outcome"] == "promoted" and updated.update["version"] == f"{NAME}:2"
    assert [(f["name"], f["rows"]) for f in updated.update["files"]] == [("a.csv", 12), ("b.jsonl", 12)]
    assert versions(registry_url)[2] == "production"
    trained = [json.loads(line) for part in ("train", "eval")
               for line in (updated.result.run_dir / "data" / f"{part}.jsonl").read_text().splitlines()]
    origins = {r["origin"].split(":")[0].rsplit("/", 1)[-1] for r in trained if r["source"] == "new"}
    assert origins == {"a.csv", "b.jsonl"}

    assert after.files == {"c.csv": 8} and after.waiting_rows == 8 and after.update is None
    saved = state(inbox)
    assert saved["taken"]["a-again.csv"]["duplicate_of"] == "a.csv"
    assert [u["outcome"] for u in saved["updates"]] == ["promoted"]
    assert saved["taken"]["a.csv"]["update"] == 0 and len(saved["taken"]["a.csv"]["sha256"]) == 64


def test_a_rejected_batch_is_recorded_and_not_retried(inbox, registry_url, tmp_path):
    feedback_db = tmp_path / "feedback.db"
    store = FeedbackStore(feedback_db)
    answer = Response(model=NAME, prompt="my warranty card is broken", answer="billing")
    store.add("r-1", answer, correction="product", reviewer="ana")
    store.add("r-1", answer, rating=1)  # a rating alone teaches nothing: not counted
    store.close()
    write_csv(inbox / "a.csv", ticket_rows(3, seed=6))
    args = ["--watch", str(inbox), "--min-rows", "13", "--once", "--feedback", "--feedback-db", str(feedback_db),
            "--gate", NEVER, "--gate-new", ALWAYS, "--registry-url", registry_url,
            "--output-dir", str(tmp_path / "runs")]

    first = cli(*args)
    second = cli(*args)
    third = cli(*args, "--json")

    assert first.exit_code == 0, first.output
    assert "1 of 13 rows waiting (0 files, 1 feedback)" in first.output
    assert second.exit_code == 3, second.output
    assert "gate failed" in second.output
    assert versions(registry_url)[2] == "archived" and len(versions(registry_url)) == 2
    record = state(inbox)["updates"][-1]
    assert record["outcome"] == "rejected" and record["feedback_rows"] == 1
    assert [f["name"] for f in record["files"]] == ["a.csv"]
    assert len(record["failing"]) == 1 and record["failing"][0].startswith(f"{NAME}:1: {NEVER}")
    assert third.exit_code == 0, third.output
    assert json.loads(third.output) == {
        "waiting_rows": 0, "min_rows": 13, "files": {}, "feedback_rows": 0, "feedback_elsewhere": {}, "settling": [],
        "set_aside": {}, "update": None}


def test_feedback_under_the_name_the_server_used_is_named_until_feedback_name_counts_it(inbox, registry_url,
                                                                                         tmp_path):
    feedback_db = tmp_path / "feedback.db"
    store = FeedbackStore(feedback_db)
    store.add("r-1", Response(model="support-bot", prompt="my warranty card is broken", answer="billing"),
              correction="product", reviewer="ana")
    store.close()
    args = ["--watch", str(inbox), "--min-rows", "13", "--once", "--feedback", "--feedback-db", str(feedback_db),
            "--registry-url", registry_url, "--output-dir", str(tmp_path / "runs")]

    unnamed = cli(*args, "--json")
    named = cli(*args, "--feedback-name", "support-bot", "--json")

    assert unnamed.exit_code == 0, unnamed.output
    summary = json.loads(unnamed.output)
    assert summary["feedback_rows"] == 0 and summary["feedback_elsewhere"] == {"support-bot": 1}
    assert named.exit_code == 0, named.output
    assert json.loads(named.output)["feedback_rows"] == 1 and json.loads(named.output)["feedback_elsewhere"] == {}
    line = cli(*args)
    assert "feedback not counted, stored under a name no registered model has: support-bot (1)" in line.output
    assert "--feedback-name" in line.output


def test_an_update_that_fails_is_recorded_and_the_watch_goes_on(inbox, registry_url, tmp_path):
    write_csv(inbox / "unlabelled.csv", [{"text": f"my parcel is late {i}"} for i in range(15)])
    args = ["--watch", str(inbox), "--min-rows", "10", "--once", "--registry-url", registry_url,
            "--output-dir", str(tmp_path / "runs"), "--quiet"]

    assert cli(*args).exit_code == 0
    failed = cli(*args)
    after = cli(*args)

    assert failed.exit_code == 2, failed.output
    record = state(inbox)["updates"][-1]
    assert record["outcome"] == "error" and "label" in record["error"]
    assert [f["name"] for f in record["files"]] == ["unlabelled.csv"]
    assert after.exit_code == 0, after.output
    assert state(inbox)["waiting"]["rows"] == 0 and len(state(inbox)["updates"]) == 1
    assert versions(registry_url) == {1: "production"}


@pytest.mark.parametrize(("extra", "message"), [
    (["--data", "new.csv"], "not from --data"),
    (["--dry-run"], "cannot be combined with --dry-run"),
])
def test_watch_refuses_flags_it_cannot_honour(inbox, extra, message):
    outcome = cli("--watch", str(inbox), *extra)
    assert outcome.exit_code == 2 and message in outcome.output


@pytest.mark.parametrize("flags", [["--once"], ["--min-rows", "5"], ["--interval", "1"]])
def test_watch_options_need_watch(flags):
    outcome = cli("--data", "new.csv", *flags)
    assert outcome.exit_code == 2 and "only make sense with --watch" in outcome.output


def test_one_watcher_per_folder_and_one_model_per_folder(inbox, tmp_path):
    missing = cli("--watch", str(tmp_path / "nowhere"), "--once")
    assert missing.exit_code == 2 and "is not a folder" in missing.output

    with Watcher(NAME, inbox, min_rows=5) as watcher:
        watcher.poll()
        busy = cli("--watch", str(inbox), "--once")
    assert busy.exit_code == 2 and "another watcher" in busy.output

    with pytest.raises(DomaintuneError, match="watched for 'watched-intents'"):
        with Watcher("other-model", inbox) as other:
            other.poll()
