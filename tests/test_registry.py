"""The model registry on SQLite and PostgreSQL: registration, stages and the promotion policy,
rollback, diff, tamper detection for artifacts and audit entries, and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import secrets
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from domaintune.registry.errors import PromotionRefused, RegistryError
from domaintune.registry.policy import check_promotion, headline_metric
from domaintune.evaluate.metrics import HEADLINE
from domaintune.recipe import Recipe, dump_recipe, resolve_defaults
from domaintune.registry.store import Registry, parse_ref, register_run

pytest_plugins = ["postgres"]  # the database_url fixture: SQLite and PostgreSQL


def make_run(root: Path, name: str = "support-intents", *, tuned: float = 0.80,
             interval: tuple[float, float] | None = (0.70, 0.90), task: str = "classification",
             gates: list[dict] | None = None, learning_rate: float = 2e-4,
             difference: tuple[float, float] | None = None, eval_rows: str | None = None) -> Path:
    """A small run directory shaped like the one `domaintune run` writes, with a consistent lineage.json;
    ``difference``: the paired interval of tuned − base on the headline metric; ``eval_rows``: the
    text of data/eval.jsonl (none written without it)."""
    run_id = secrets.token_hex(6)
    run_dir = root / name / run_id
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(secrets.token_bytes(256))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (run_dir / "data").mkdir()
    (run_dir / "data" / "train.jsonl").write_text(json.dumps({"text": "refund please", "label": "billing"}) + "\n")
    if eval_rows is not None:
        (run_dir / "data" / "eval.jsonl").write_text(eval_rows)
    spec = Recipe.model_validate({"name": name, "task": task, "base_model": "minilm-l6", "data": {"train": "data/train.csv"},
                                  "training": {"learning_rate": learning_rate}})
    (run_dir / "recipe.yaml").write_text(dump_recipe(resolve_defaults(spec, 160)))
    metric = headline_metric(task)
    others = {name: 0.5 for name in HEADLINE[task]}  # the rest of the task's metrics, as a run has them
    metrics = {"task": task, "eval_rows": 40, "train_rows": 160, "base": {**others, metric: 0.5},
               "tuned": {**others, metric: tuned},
               "intervals": {metric: {"tuned": list(interval)}} if interval else {}}
    if difference is not None:
        metrics["intervals"].setdefault(metric, {})["difference"] = list(difference)
    if gates is not None:
        metrics["gates"] = gates
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    lineage = {
        "run_id": run_id, "domaintune_version": "0.1.0",
        "recipe": {"file": "recipe.yaml", "sha256": sha(run_dir / "recipe.yaml"),
                   "resolved_sha256": sha(run_dir / "recipe.yaml")},
        "data": [{"file": "data/train.csv", "sha256": "ab" * 32, "bytes": 100}],
        "processed_data": [{"file": p.relative_to(run_dir).as_posix(), "sha256": sha(p)}
                           for p in sorted((run_dir / "data").iterdir())],
        "base_model": {"name": "minilm-l6", "path": "/models/minilm",
                       "files": [{"file": "model.safetensors", "sha256": "cd" * 32}]},
        "adapter": [{"file": p.relative_to(run_dir).as_posix(), "sha256": sha(p)} for p in sorted(adapter.iterdir())],
        "libraries": {"python": "3.11.9", "torch": "2.13.0"}, "machine": {"cpus": 2}, "timings_s": {"train_s": 1.5},
    }
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    return run_dir


@pytest.fixture
def registry(database_url):
    with Registry(database_url) as registry:
        yield registry


def test_register_records_lineage_and_every_artifact_hash(registry, tmp_path):
    first = registry.register(make_run(tmp_path), actor="ana")
    second = registry.register(make_run(tmp_path, tuned=0.85))
    assert (first.ref, first.stage, first.registered_by) == ("support-intents:1", "candidate", "ana")
    assert second.version == 2
    assert set(first.artifacts) == {"recipe.yaml", "metrics.json", "lineage.json", "data/train.jsonl",
                                    "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    weights = first.run_dir / "adapter" / "adapter_model.safetensors"
    assert first.artifacts["adapter/adapter_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert registry.get("support-intents").version == 2  # newest by default
    assert registry.get("support-intents", 1).lineage["base_model"]["name"] == "minilm-l6"
    assert [v.ref for v in registry.list()] == ["support-intents:1", "support-intents:2"]
    [entry_1, entry_2] = registry.audit()
    assert (entry_1.action, entry_1.target, entry_1.actor) == ("register", "support-intents:1", "ana")
    assert entry_2.details["artifacts"] == second.artifacts


def test_register_refuses_incomplete_tampered_or_repeated_runs(registry, tmp_path):
    run = make_run(tmp_path)
    registry.register(run)
    with pytest.raises(RegistryError, match="already registered as support-intents:1"):
        registry.register(run)
    incomplete = make_run(tmp_path)
    (incomplete / "metrics.json").unlink()
    with pytest.raises(RegistryError, match="metrics.json missing"):
        registry.register(incomplete)
    no_data = make_run(tmp_path)
    (no_data / "data" / "train.jsonl").unlink()
    with pytest.raises(RegistryError, match="data/train.jsonl missing"):
        registry.register(no_data)
    edited = make_run(tmp_path)
    (edited / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="does not match its lineage.json: adapter/adapter_config.json"):
        registry.register(edited)
    with pytest.raises(RegistryError, match="no such run directory"):
        registry.register(tmp_path / "nowhere")
    assert len(registry.list()) == 1 and len(registry.audit()) == 1  # refusals leave no trace


def test_unknown_names_versions_and_stages_raise_with_a_hint(registry, tmp_path):
    registry.register(make_run(tmp_path))
    with pytest.raises(RegistryError, match="no model named 'nope'") as caught:
        registry.get("nope")
    assert caught.value.hint
    with pytest.raises(RegistryError, match="has no version 7") as caught:
        registry.get("support-intents", 7)
    assert "1" in caught.value.hint
    with pytest.raises(RegistryError, match="unknown stage 'live'") as caught:
        registry.promote("support-intents", 1, "live")
    assert caught.value.hint == "promote to staging, production, archived"  # not candidate, which --to refuses
    with pytest.raises(RegistryError, match="cannot promote to 'candidate'"):
        registry.promote("support-intents", 1, "candidate")
    with pytest.raises(RegistryError, match="no version production"):
        registry.get("support-intents", "production")
    with pytest.raises(RegistryError, match="no model named 'nope'"):
        registry.audit("nope")
    with pytest.raises(RegistryError, match="no model named 'nope'"):
        registry.require("nope")
    assert registry.list("nope") == []  # a filter, as callers rely on
    assert registry.audit("support-intents:7") == []  # a known model: no entries is an answer


def test_parse_ref():
    assert parse_ref("support-intents") == ("support-intents", None)
    assert parse_ref("support-intents:12") == ("support-intents", 12)
    assert parse_ref("support-intents:production") == ("support-intents", "production")
    with pytest.raises(RegistryError):
        parse_ref("support-intents:latest-ish")


def test_promotion_moves_through_the_stages_with_one_production_version(registry, tmp_path):
    v1 = registry.register(make_run(tmp_path))
    v2 = registry.register(make_run(tmp_path, tuned=0.82))
    with pytest.raises(PromotionRefused, match="production takes versions from staging") as refused:
        registry.promote(v1.name, 1, "production")
    assert refused.value.hint.startswith("`domaintune registry promote support-intents:1 --to staging` first; or")
    registry.promote(v1.name, 1, "staging")
    first = registry.promote(v1.name, 1, "production", actor="ana", reason="first release")
    assert first.version.stage == "production" and first.replaced is None and not first.forced
    registry.promote(v2.name, 2, "staging")
    second = registry.promote(v2.name, 2, "production")
    assert second.replaced.ref == "support-intents:1"
    assert "no regression" in " ".join(second.decision.passed)
    assert [(v.version, v.stage) for v in registry.list()] == [(1, "archived"), (2, "production")]
    assert registry.get("support-intents", "production").version == 2
    with pytest.raises(RegistryError, match="already production"):
        registry.promote(v2.name, 2, "production")
    promote = registry.audit()[-1]
    assert promote.details == {"from": "staging", "to": "production", "checks": second.decision.passed,
                               "replaced": "support-intents:1"}
    refused = [e for e in registry.audit() if e.action == "promote-refused"]
    assert [(e.target, e.details["refusals"]) for e in refused] == [
        ("support-intents:1", ["it is candidate: production takes versions from staging"])]
    card = (second.version.run_dir / "model_card.md").read_text()
    assert "`support-intents:2`, stage **production**" in card and "## Ethical considerations" in card
    assert "stage **staging**, promoted by ana" not in card
    replaced_card = (first.version.run_dir / "model_card.md").read_text()
    assert "stage **production**" not in replaced_card  # it was archived when v2 replaced it
    assert "`support-intents:1`, stage **archived**" in replaced_card
    assert "(replaced in production by support-intents:2)" in replaced_card


def test_a_failed_gate_is_refused_and_force_needs_a_justification(registry, tmp_path):
    gates = [{"expr": "tuned.accuracy >= base.accuracy + 0.05", "passed": True},
             {"expr": "tuned.macro_f1 >= 0.9", "passed": False}]
    version = registry.register(make_run(tmp_path, gates=gates))
    with pytest.raises(PromotionRefused) as refused:
        registry.promote(version.name, 1, "staging")
    assert refused.value.reasons == ["gate `tuned.macro_f1 >= 0.9` failed"]
    with pytest.raises(RegistryError, match="needs a justification"):
        registry.promote(version.name, 1, "staging", force=True)
    assert registry.get(version.name, 1).stage == "candidate"
    forced = registry.promote(version.name, 1, "staging", force=True, actor="lead", reason="f1 gate too strict for 4 labels")
    assert forced.forced and forced.version.stage == "staging"
    entry = registry.audit()[-1]
    assert (entry.actor, entry.reason) == ("lead", "f1 gate too strict for 4 labels")
    assert entry.details["forced_over"] == ["gate `tuned.macro_f1 >= 0.9` failed"]


def test_a_regression_against_production_is_refused(registry, tmp_path):
    registry.register(make_run(tmp_path, tuned=0.90, interval=(0.85, 0.95)))
    registry.register(make_run(tmp_path, tuned=0.75, interval=(0.65, 0.85)))  # upper end below 0.90
    registry.register(make_run(tmp_path, tuned=0.86, interval=(0.78, 0.93)))  # worse point, overlapping interval
    for version in (1, 2, 3):
        registry.promote("support-intents", version, "staging")
    registry.promote("support-intents", 1, "production")
    refusal = r"regression: accuracy 0.7500 .* worse than production support-intents:1's 0.9000"
    with pytest.raises(PromotionRefused, match=refusal):
        registry.promote("support-intents", 2, "production")
    assert registry.promote("support-intents", 3, "production").version.stage == "production"


@pytest.mark.parametrize(("task", "candidate", "interval", "production", "allowed"), [
    ("classification", 0.70, (0.60, 0.80), 0.85, False),
    ("classification", 0.80, (0.70, 0.90), 0.85, True),
    ("classification", 0.84, None, 0.85, False),  # no interval recorded: the point value decides
    ("sft", 0.50, (0.40, 0.60), 0.55, True),
    ("pretrain", 12.0, None, 11.0, False),  # perplexity: lower is better
    ("pretrain", 10.5, None, 11.0, True),
])
def test_the_regression_rule_on_each_task(task, candidate, interval, production, allowed):
    metric = headline_metric(task)
    metrics = {"task": task, "tuned": {metric: candidate}, "intervals": {metric: {"tuned": list(interval)}} if interval else {}}
    decision = check_promotion("staging", "production", metrics, ("m:1", {"task": task, "tuned": {metric: production}}))
    assert decision.allowed is allowed
    other_task = check_promotion("staging", "production", metrics, ("m:1", {"task": "other", "tuned": {}}))
    assert not other_task.allowed


@pytest.mark.parametrize(("task", "difference", "allowed"), [
    ("classification", (-0.20, -0.05), False),  # the tuned model is surely worse than its base
    ("classification", (-0.10, 0.05), True),  # maybe worse, maybe not: not refused
    ("classification", None, True),  # no paired interval recorded: not checked, and said so
    ("pretrain", (0.5, 2.0), False),  # perplexity went up: worse
    ("pretrain", (-2.0, -0.5), True),
])
def test_a_version_worse_than_its_base_is_refused(task, difference, allowed):
    metric = headline_metric(task)
    metrics = {"task": task, "tuned": {metric: 0.5}, "intervals": {metric: {"difference": list(difference)}}
               if difference else {}}
    for to in ("staging", "production"):
        decision = check_promotion("staging", to, metrics, None)
        assert decision.allowed is allowed
        lines = decision.passed + decision.refusals
        assert any("worse than its base model" in line if difference else "not compared with its base" in line
                   for line in lines), lines


def test_promoting_a_version_worse_than_its_base_is_refused_unless_forced(registry, tmp_path):
    version = registry.register(make_run(tmp_path, difference=(-0.15, -0.02)))
    with pytest.raises(PromotionRefused, match=r"worse than its base model: accuracy tuned − base 95% interval "
                                               r"-0.1500 to -0.0200 lies entirely below 0"):
        registry.promote(version.name, 1, "staging")
    assert registry.get(version.name, 1).stage == "candidate"
    forced = registry.promote(version.name, 1, "staging", force=True, reason="the base is the better fallback here")
    assert forced.forced and registry.audit()[-1].details["forced_over"][0].startswith("worse than its base model")
    with pytest.raises(PromotionRefused, match="worse than its base model"):
        registry.promote(version.name, 1, "production")


def test_the_regression_check_says_when_the_versions_were_scored_on_different_rows(registry, tmp_path):
    rows = json.dumps({"text": "where is my parcel", "label": "shipping"}) + "\n"
    other_rows = json.dumps({"text": "card declined", "label": "billing"}) + "\n"
    runs = [make_run(tmp_path, tuned=tuned, eval_rows=text)
            for tuned, text in ((0.80, rows), (0.84, rows), (0.86, other_rows), (0.88, None))]
    for run in runs:
        version = registry.register(run)
        registry.promote(version.name, version.version, "staging")
    registry.promote("support-intents", 1, "production")

    same = registry.promote("support-intents", 2, "production").decision.passed
    [line] = [line for line in same if line.startswith("no regression")]
    assert "eval rows" not in line  # the same data/eval.jsonl: the numbers compare
    different = registry.promote("support-intents", 3, "production").decision.passed
    [line] = [line for line in different if line.startswith("no regression")]
    assert line.endswith(f"(on different eval rows: compare them on the same rows with "
                         f"`domaintune compare {runs[1].resolve()} {runs[2].resolve()}`)")
    unknown = registry.promote("support-intents", 4, "production").decision.passed
    assert any("the eval rows of one of them are not recorded, so they may differ" in line for line in unknown)


def test_every_version_whose_stage_changes_gets_its_card_rewritten(registry, tmp_path):
    def card(version: int) -> str:
        return (registry.get("support-intents", version).run_dir / "model_card.md").read_text()

    for tuned in (0.80, 0.70, 0.82):
        version = registry.register(make_run(tmp_path, tuned=tuned))
        registry.promote(version.name, version.version, "staging")
    registry.promote("support-intents", 1, "production")
    registry.promote("support-intents", 2, "production", force=True, reason="board approved", actor="lead")
    assert "`support-intents:2`, stage **production**" in card(2)
    assert "`support-intents:1`, stage **archived**" in card(1)
    assert "(replaced in production by support-intents:2: board approved)" in card(1)

    registry.rollback("support-intents", reason="complaints", actor="ops")
    assert "`support-intents:2`, stage **archived**, promoted by ops" in card(2) and "rolled back: complaints" in card(2)
    assert "`support-intents:1`, stage **production**, promoted by ops" in card(1)
    assert "restored by a rollback: complaints" in card(1)

    registry.promote("support-intents", 3, "production")
    shutil.rmtree(registry.get("support-intents", 3).run_dir)  # a run directory cleaned up since
    assert registry.rollback("support-intents", reason="v3 is gone").version == 1
    assert "`support-intents:1`, stage **production**" in card(1)


def test_rollback_restores_the_production_versions_in_reverse_order(registry, tmp_path):
    for _ in range(3):
        version = registry.register(make_run(tmp_path))
        registry.promote(version.name, version.version, "staging")
        registry.promote(version.name, version.version, "production")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.rollback("support-intents", reason="")
    assert registry.rollback("support-intents", reason="v3 mislabels refunds", actor="ops").version == 2
    assert registry.get("support-intents", 3).stage == "archived"
    assert registry.rollback("support-intents", reason="v2 too").version == 1
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback("support-intents", reason="again")
    assert [v.stage for v in registry.list()] == ["production", "archived", "archived"]
    entry = registry.audit()[-1]
    assert (entry.action, entry.target, entry.details) == ("rollback", "support-intents", {"from": 2, "to": 1})
    with pytest.raises(RegistryError, match="no model named"):
        registry.rollback("unknown-model", reason="x")


def test_a_version_archived_by_hand_is_not_a_rollback_target(registry, tmp_path):
    for _ in range(2):
        version = registry.register(make_run(tmp_path))
        registry.promote(version.name, version.version, "staging")
        registry.promote(version.name, version.version, "production")
    with pytest.raises(RegistryError, match="move of the production version support-intents:2 to archived needs a reason"):
        registry.promote("support-intents", 2, "archived")
    registry.promote("support-intents", 2, "archived", reason="pulled")
    assert registry.list(stage="production") == []
    assert registry.rollback("support-intents", reason="restore the last good one").version == 1


def test_diff_shows_metric_recipe_and_lineage_changes(registry, tmp_path):
    a = registry.register(make_run(tmp_path, tuned=0.80))
    b = registry.register(make_run(tmp_path, tuned=0.90, learning_rate=1e-4))
    changes = {(c.section, c.key): (c.a, c.b) for c in registry.diff(a, b)}
    assert changes[("metrics", "tuned.accuracy")] == (0.80, 0.90)
    assert changes[("recipe", "training.learning_rate")] == (2e-4, 1e-4)
    assert ("lineage", "adapter.adapter/adapter_model.safetensors.sha256") in changes
    assert ("lineage", "adapter.adapter/adapter_config.json.sha256") not in changes  # same bytes in both
    assert ("lineage", "base_model.name") not in changes
    assert registry.diff(a, a) == []


def test_verify_detects_an_edited_byte_a_missing_file_and_an_added_file(registry, tmp_path):
    clean = registry.register(make_run(tmp_path))
    tampered = registry.register(make_run(tmp_path))
    assert registry.verify().ok
    weights = tampered.run_dir / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    report = registry.verify()
    assert not report.ok and report.audit.ok
    problems = {check.ref: check.problems for check in report.versions}
    assert problems[clean.ref] == []
    assert len(problems[tampered.ref]) == 1 and problems[tampered.ref][0].startswith("adapter/adapter_model.safetensors: sha256")
    (tampered.run_dir / "lineage.json").write_text((tampered.run_dir / "lineage.json").read_text() + " ")
    (tampered.run_dir / "metrics.json").unlink()
    (tampered.run_dir / "adapter" / "extra.bin").write_bytes(b"x")
    with open(tampered.run_dir / "data" / "train.jsonl", "a") as fh:
        fh.write('{"text": "a row slipped in later", "label": "billing"}\n')
    problems = registry.verify(tampered.name, tampered.version).versions[0].problems
    assert sorted(p.split(":")[0] for p in problems) == ["adapter/adapter_model.safetensors", "adapter/extra.bin",
                                                        "data/train.jsonl", "lineage.json", "metrics.json"]
    assert registry.verify(clean.name, clean.version).ok


def test_a_changed_run_directory_is_neither_promoted_nor_rolled_back_to(registry, tmp_path):
    first = registry.register(make_run(tmp_path))
    registry.promote(first.name, 1, "staging")
    registry.promote(first.name, 1, "production")
    second = registry.register(make_run(tmp_path))
    weights = second.run_dir / "adapter" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    for to in ("staging", "production"):
        with pytest.raises(RegistryError, match=r"support-intents:2's run directory differs from what was registered: "
                                                r"adapter/adapter_model.safetensors: sha256") as error:
            registry.promote(second.name, 2, to, force=True, reason="forcing does not cover changed files")
        assert "registry verify support-intents:2" in error.value.hint
    assert registry.get(second.name, 2).stage == "candidate"
    registry.promote(second.name, 2, "archived", reason="a changed version can still be retired")
    weights.write_bytes(original)
    third = registry.register(make_run(tmp_path))
    registry.promote(third.name, 3, "staging")
    registry.promote(third.name, 3, "production")
    (first.run_dir / "adapter" / "extra.bin").write_bytes(b"x")
    with pytest.raises(RegistryError, match="support-intents:1's run directory differs.*extra.bin: added after registration"):
        registry.rollback(first.name, reason="v3 regressed")
    assert registry.get(first.name, "production").version == 3
    (first.run_dir / "adapter" / "extra.bin").unlink()
    assert registry.rollback(first.name, reason="v3 regressed").version == 1


def test_gates_recorded_with_their_eval_set_are_refused_naming_it(registry, tmp_path):
    gates = [{"expr": "difference.accuracy.low >= -0.02", "passed": False, "eval_set": "support-intents:1"},
             {"expr": "difference.accuracy.low >= -0.02", "passed": True, "eval_set": "new rows"}]
    version = registry.register(make_run(tmp_path, gates=gates))
    registry.promote(version.name, 1, "archived", reason="rejected by the update gate")
    with pytest.raises(PromotionRefused) as refused:
        registry.promote(version.name, 1, "staging")
    assert refused.value.reasons == ["gate `difference.accuracy.low >= -0.02` on support-intents:1 failed"]


def _tamper(registry: Registry, sql: str) -> None:
    with registry.db.engine.begin() as conn:
        conn.execute(text(sql))


def _fill_log(registry: Registry, tmp_path: Path, entries: int) -> None:
    for _ in range(entries):
        registry.register(make_run(tmp_path))


def test_verify_audit_detects_an_edited_entry(registry, tmp_path):
    _fill_log(registry, tmp_path, 4)
    assert registry.verify_audit().ok and registry.verify_audit().entries == 4
    _tamper(registry, "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
    report = registry.verify_audit()
    assert (report.ok, report.broken_seq) == (False, 2)
    assert "changed" in report.problem
    assert not registry.verify().ok


def test_verify_audit_detects_an_edit_whose_hash_was_recomputed(registry, tmp_path):
    _fill_log(registry, tmp_path, 4)
    from domaintune.registry.audit import AuditRow, entry_hash

    with registry.db.writing() as session:
        row = session.get(AuditRow, 2)
        row.reason = "made up later"
        row.hash = entry_hash(row)
    report = registry.verify_audit()
    assert (report.ok, report.broken_seq) == (False, 3)  # its successor no longer links to it


def test_verify_audit_detects_a_deleted_entry(registry, tmp_path):
    _fill_log(registry, tmp_path, 4)
    _tamper(registry, "DELETE FROM audit_log WHERE seq = 3")
    report = registry.verify_audit()
    assert (report.ok, report.broken_seq) == (False, 3)
    assert "deleted" in report.problem


def test_verify_audit_detects_a_truncated_log(registry, tmp_path):
    _fill_log(registry, tmp_path, 4)
    _tamper(registry, "DELETE FROM audit_log WHERE seq >= 3")
    report = registry.verify_audit()
    assert (report.ok, report.broken_seq) == (False, 3)
    assert "end of the log" in report.problem


def test_delete_and_deploy_are_audited(registry, tmp_path):
    for _ in range(2):
        registry.register(make_run(tmp_path))
    registry.promote("support-intents", 1, "staging")
    registry.promote("support-intents", 1, "production")
    with pytest.raises(RegistryError, match="in production"):
        registry.delete("support-intents", 1, reason="x")
    registry.delete("support-intents", 2, reason="trained on the wrong export")
    assert [v.version for v in registry.list()] == [1]
    assert registry.register(make_run(tmp_path)).version == 3  # numbers are never reused
    registry.record("deploy", "support-intents:1", details={"endpoint": "http://serve:8000"})
    actions = [(e.action, e.target) for e in registry.audit("support-intents")]
    assert ("delete", "support-intents:2") in actions and actions[-1] == ("deploy", "support-intents:1")
    with pytest.raises(RegistryError, match="unknown audit action"):
        registry.record("rename", "support-intents:1")
    assert registry.verify_audit().ok


def test_the_migrated_schema_matches_the_models(registry):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from domaintune.registry.schema import Base

    with registry.db.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    Registry(registry.url).close()  # opening an up-to-date registry again changes nothing


def test_register_run_uses_the_environment_url(database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINTUNE_REGISTRY_URL", database_url)
    monkeypatch.setenv("DOMAINTUNE_USER", "pipeline-bot")
    version = register_run(make_run(tmp_path))
    assert (version.ref, version.registered_by) == ("support-intents:1", "pipeline-bot")
    with Registry() as registry:  # the same database: the entry is there
        assert [(e.action, e.actor) for e in registry.audit()] == [("register", "pipeline-bot")]


def test_default_registry_is_a_sqlite_file_in_domaintune_home(tmp_path, monkeypatch):
    monkeypatch.delenv("DOMAINTUNE_REGISTRY_URL", raising=False)
    monkeypatch.setenv("DOMAINTUNE_HOME", str(tmp_path / "home"))
    with Registry() as registry:
        registry.register(make_run(tmp_path))
    assert (tmp_path / "home" / "registry.db").is_file()


def _register_and_promote(url: str, run_dirs: list[str], actor: str) -> None:
    with Registry(url) as registry:
        for run_dir in run_dirs:
            version = registry.register(run_dir, actor=actor)
            registry.promote(version.name, version.version, "staging", actor=actor)
            registry.promote(version.name, version.version, "production", actor=actor)


def test_concurrent_processes_keep_the_registry_and_the_chain_whole(database_url, tmp_path):
    workers, runs_each = 4, 3
    jobs = [(database_url, [str(make_run(tmp_path)) for _ in range(runs_each)], f"worker-{i}") for i in range(workers)]
    # The workers also create the registry at the same time: migrations must run once.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(_register_and_promote, jobs)
    with Registry(database_url) as registry:
        versions = registry.list()
        entries = registry.audit()
        assert [v.version for v in versions] == list(range(1, workers * runs_each + 1))
        assert [v.stage for v in versions].count("production") == 1
        assert len(entries) == 3 * workers * runs_each and registry.verify_audit().ok
        last_promotion = [e for e in entries if e.action == "promote"][-1]
        assert last_promotion.target == registry.get("support-intents", "production").ref
        for actor in (f"worker-{i}" for i in range(workers)):  # each worker's steps, in its order
            steps = [(e.action, e.details.get("to")) for e in entries if e.actor == actor]
            assert steps == [("register", None), ("promote", "staging"), ("promote", "production")] * runs_each


def test_verify_rehashes_inputs_that_are_on_this_machine(registry, tmp_path):
    source = tmp_path / "tickets.csv"
    source.write_text("text,label\nrefund please,billing\n")
    run_dir = make_run(tmp_path)
    lineage = json.loads((run_dir / "lineage.json").read_text())
    lineage["data"] = [{"file": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "bytes": 30}]
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    version = registry.register(run_dir)

    check = registry.verify(version.name, version.version).versions[0]
    assert check.problems == [] and check.inputs_absent == ["model.safetensors"]

    source.write_text("text,label\nrefund please,shipping\n")  # the source data changed after training
    report = registry.verify(version.name, version.version)
    assert not report.ok
    assert report.versions[0].problems[0].startswith(f"input {source}: sha256")
