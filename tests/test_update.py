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
from domaintune.cli.registry import registry_app
from domaintune.cli.update import update as update_command
from domaintune.registry.errors import PromotionRefused
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
    # The verdict is in the version's registered metrics: promoting it later is refused, naming the set.
    gates = rejected.metrics["gates"]
    assert {g["eval_set"] for g in gates} >= {f"{NAME}:1"} and not all(g["passed"] for g in gates)
    old = next(c for c in rejected.metrics["update"]["comparisons"] if c["eval_set"] == f"{NAME}:1")
    assert old["eval_rows"] > rejected.metrics["eval_rows"] and not old["passed"]
    with Registry(registry_url) as registry, pytest.raises(PromotionRefused, match=f"on {NAME}:1 failed"):
        registry.promote(NAME, 2, "staging")
    listed = runner.invoke(registry_app, ["list", NAME, "--registry-url", registry_url], env={"COLUMNS": "300"})
    assert f"on {NAME}:1's {old['eval_rows']} rows" in listed.output and "gate failed" in listed.output, listed.output
    shown = runner.invoke(registry_app, ["show", f"{NAME}:2", "--registry-url", registry_url])
    assert f"update of {NAME}:1" in shown.output and "failed" in shown.output, shown.output


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
    printed = json.loads(outcome.output)
    assert printed["passed"] is None  # a dry run judges nothing
    summary = printed["data"]
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
        # a label production knows: the server refuses a correction to a label the model has not
        answered = client.post("/v1/classify", json={"model": NAME, "input": "my parcel tracking is late urgent"}).json()
        corrected = client.post("/v1/feedback", json={"response_id": answered["id"], "correction": "shipping",
                                                      "reviewer": "ana"}).json()
        client.post("/v1/feedback", json={"response_id": answered["id"], "rating": 5})

    result = update(NAME, [new_rows(tmp_path)], feedback=True, feedback_db=feedback_db, registry_url=registry_url,
                    output_dir=tmp_path / "runs", gate="tuned.accuracy >= 0", gate_new="tuned.accuracy >= 0")

    rows = [r for r in read_jsonl(result.run_dir / "data" / "train.jsonl") if r["source"].startswith("feedback:")]
    assert [(r["source"], r["reviewer"], r["text"], r["label"]) for r in rows] == [
        (f"feedback:{corrected['id']}", "ana", "my parcel tracking is late urgent", "shipping")]
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


def cli(*args: str):
    app = typer.Typer()
    app.command()(update_command)
    return runner.invoke(app, list(args))


def corrections(path, *answers, model=NAME):
    """A feedback file with one correction of each (text, label) in ``answers``, stored under ``model``."""
    from domaintune.serve.feedback import FeedbackStore, Response

    store = FeedbackStore(path)
    for i, (text, label) in enumerate(answers):
        store.add(f"r-{i}", Response(model, text, "billing"), correction=label, reviewer="ana")
    store.close()
    return path


def test_feedback_stored_under_the_served_name_is_pointed_out_and_can_be_read(registry_url, tmp_path):
    # Servers used to store feedback under the name they served a model as ("triage"), not its
    # registry name: an update looking under the registry name found nothing and said nothing.
    db = corrections(tmp_path / "feedback.db", *[(f"where is the courier with my parcel {w}", "shipping")
                                                 for w in ("today", "again", "please")], model="triage")
    common = ("--feedback", "--feedback-db", str(db), "--dry-run", "--registry-url", registry_url)

    lost = cli(NAME, *common)

    assert lost.exit_code == 2, lost.output
    assert f"no feedback for '{NAME}'" in lost.output and "triage (3)" in lost.output
    assert "--feedback-name triage" in lost.output
    assert "or --feedback" not in lost.output  # it was given

    found = cli(NAME, *common, "--feedback-name", "triage", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["data"]["train_rows"]["feedback"] >= 1


def test_the_default_gate_on_new_rows_accepts_a_candidate_as_good_as_production():
    from domaintune.evaluate.gates import check_gate
    from domaintune.update.settings import default_gates

    # Production already right on every new row: no candidate can do better, so "better" rejected all.
    perfect = {"base": {"accuracy": 1.0}, "tuned": {"accuracy": 1.0}, "intervals": {}}
    assert check_gate(default_gates("classification", 0.02)[1], perfect).passed
    assert not check_gate(default_gates("classification", 0.02)[1],
                          {**perfect, "tuned": {"accuracy": 0.9}}).passed
    same = {"base": {"perplexity": 3.0}, "tuned": {"perplexity": 3.0}, "intervals": {}}
    assert check_gate(default_gates("pretrain", 0.02)[1], same).passed
    assert not check_gate(default_gates("pretrain", 0.02)[1], {**same, "tuned": {"perplexity": 3.1}}).passed


def test_a_gate_failed_by_a_wide_interval_says_the_evidence_is_insufficient():
    from domaintune.update.settings import default_gates
    from domaintune.update.updater import update_gate

    earlier = default_gates("classification", 0.02)[0]
    wide = {"eval_rows": 12, "base": {"accuracy": 0.75}, "tuned": {"accuracy": 0.75},
            "intervals": {"accuracy": {"difference": [-0.0833, 0.0833]}}}
    gate = update_gate(earlier, wide)
    assert not gate["passed"]
    assert "insufficient evidence, not a regression" in gate["failing"][0] and "12 rows" in gate["failing"][0]

    dropped = {**wide, "tuned": {"accuracy": 0.7}, "intervals": {"accuracy": {"difference": [-0.15, -0.01]}}}
    assert "insufficient" not in update_gate(earlier, dropped)["failing"][0]  # a measured drop is one


def test_the_report_gives_a_verdict_only_on_the_metrics_a_gate_checked():
    from domaintune.update.report import _verdict
    from domaintune.update.updater import update_gate

    compared = {"eval_rows": 40, "base": {"exact_match": 0.25, "rouge_l": 0.75}, "tuned": {"exact_match": 0.25,
                "rouge_l": 0.29}, "intervals": {"exact_match": {"difference": [-0.1, 0.1]}}}
    held = [update_gate("difference.exact_match.low >= -0.2", compared)]
    assert [_verdict(m, held) for m in ("exact_match", "rouge_l")] == ["held", "not gated"]
    failed = [update_gate("difference.exact_match.low >= 0 and tuned.rouge_l >= 0.5", compared)]
    assert [_verdict(m, failed) for m in ("exact_match", "rouge_l")] == ["**failed**", "**failed**"]
    only_rouge = [update_gate("difference.exact_match.low >= -0.2 and tuned.rouge_l >= 0.5", compared)]
    assert [_verdict(m, only_rouge) for m in ("exact_match", "rouge_l")] == ["held", "**failed**"]


def test_one_correction_replays_every_label_and_errors_name_the_inputs(registry_url, tmp_path):
    # One row at replay_ratio 0.5 gave no replay at all: training lacked labels that production's
    # eval set has, and the update stopped naming its own temporary eval file.
    db = corrections(tmp_path / "feedback.db", ("where is the courier with my parcel tracking urgent", "shipping"))

    result = update(NAME, feedback=True, feedback_db=db, registry_url=registry_url, output_dir=tmp_path / "runs",
                    promote=False, gate="tuned.accuracy >= 0", gate_new="tuned.accuracy >= 0")

    trained = read_jsonl(result.run_dir / "data" / "train.jsonl")
    replayed = [r["label"] for r in trained if r["source"] == "replay"]
    assert all(replayed.count(label) >= 3 for label in OLD), replayed
    assert result.assembly.train_rows["feedback"] == 1

    db2 = corrections(tmp_path / "two.db", ("my refund for the charge is late", "billing"),
                      ("the warranty manual is broken", "product"))
    with pytest.raises(DataError) as caught:  # no replay asked for: the labels are missing, said so
        update(NAME, feedback=True, feedback_db=db2, registry_url=registry_url, replay_ratio=0, dry_run=True)
    text = str(caught.value)
    assert "never occur in training" in text and f"{NAME}:1 " in text and "replay_ratio" in text
    assert "eval.jsonl" not in text and "train.jsonl" not in text  # the update's own files, already deleted


def test_no_production_and_unknown_models_are_told_apart(registry_url, tmp_path):
    unknown = cli("no-such-model", "--dry-run", "--registry-url", registry_url)
    assert unknown.exit_code == 2
    assert "no model named 'no-such-model' is registered" in unknown.output and NAME in unknown.output

    with Registry(registry_url) as registry:
        registry.promote(NAME, 1, "archived", reason="test")
    none = cli(NAME, "--dry-run", "--registry-url", registry_url)
    assert none.exit_code == 2 and "no production version" in none.output
    assert f"registry promote {NAME}:1 --to staging" in none.output
    assert f"registry promote {NAME}:1 --to production" in none.output


def test_data_errors_name_the_data_file_and_the_column_production_reads(registry_url, tmp_path):
    wrong = write_csv(tmp_path / "renamed.csv", [{"body": "my parcel is late", "label": "shipping"}] * 4)
    columns = cli(NAME, "--data", str(wrong), "--dry-run", "--registry-url", registry_url)
    assert columns.exit_code == 2
    assert "renamed.csv" in columns.output and "no column 'text'" in columns.output
    assert "data.text_field" in columns.output and "needs that column" in columns.output
    assert "train.jsonl" not in columns.output

    missing = cli(NAME, "--data", str(tmp_path / "nowhere.csv"), "--dry-run", "--registry-url", registry_url)
    assert missing.exit_code == 2
    assert "nowhere.csv" in missing.output and "--data" in missing.output and "does not exist" in missing.output
    assert "relative to the recipe" not in missing.output


def test_a_candidate_the_registry_policy_refuses_is_rejected_like_a_failed_gate():
    """The gates compare candidate and production; the policy also holds it to its own base."""
    from types import SimpleNamespace

    from domaintune.registry.errors import PromotionRefused
    from domaintune.update.updater import UpdateResult, _decide

    class Registry:
        def __init__(self):
            self.moves = []

        def promote(self, name, version, to, **kwargs):
            if to == "staging":
                raise PromotionRefused(f"{name}:{version}", to, ["worse than its base model: accuracy ..."])
            self.moves.append((to, kwargs.get("reason")))

    registry = Registry()
    result = UpdateResult("m", "classification", "m:1", assembly=None, settings=None,
                          comparisons=[{"eval_set": "m:1", "gates": [{"passed": True, "failing": []}]}])
    assert result.passed
    stage = _decide(registry, SimpleNamespace(name="m", version=2), result, promote=True)
    assert stage == "archived" and not result.passed
    assert result.failing == ["registry policy: worse than its base model: accuracy ..."]
    assert registry.moves == [("archived", "rejected by the registry policy: worse than its base model: accuracy ...")]
