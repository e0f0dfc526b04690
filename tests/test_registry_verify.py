"""`verify` checks the registry's tables against the hash-chained audit log, on SQLite and
PostgreSQL: a forged file together with its artifacts row and the stored metrics, a stage or a
rollback target changed in the database, a version added or removed behind the registry's back;
and registries whose register entries predate the record hashes still verify."""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import select
from test_registry import make_run

from domaintune.registry.audit import GENESIS, HEAD_ID, AuditRow, canonical_json, entry_hash
from domaintune.registry.schema import AuditHead, VersionRow
from domaintune.registry.store import Registry

pytest_plugins = ["postgres"]  # the database_url fixture: SQLite and PostgreSQL


@pytest.fixture
def registry(database_url):
    with Registry(database_url) as registry:
        yield registry


def _edit_version(registry: Registry, version: int, edit) -> None:
    """Change a version's rows directly in the database, as someone with write access could,
    without the registry (so without an audit entry)."""
    with registry.db.writing() as session:
        edit(session.scalar(select(VersionRow).where(VersionRow.version == version)))


def _problems(registry: Registry, ref: str) -> list[str]:
    report = registry.verify()
    assert not report.ok and report.audit.ok  # the chain itself was not touched
    return {check.ref: check.problems for check in report.versions}[ref]


def _in_production(registry: Registry, tmp_path) -> None:
    for tuned in (0.80, 0.84):
        version = registry.register(make_run(tmp_path, tuned=tuned))
        registry.promote(version.name, version.version, "staging")
        registry.promote(version.name, version.version, "production")


def test_verify_finds_a_forged_metrics_file_whose_artifact_row_and_metrics_were_forged_too(registry, tmp_path):
    _in_production(registry, tmp_path)
    assert registry.verify().ok
    version = registry.get("support-intents", 2)
    forged = {**version.metrics, "tuned": {**version.metrics["tuned"], "accuracy": 0.99}}
    (version.run_dir / "metrics.json").write_text(json.dumps(forged))
    sha = hashlib.sha256((version.run_dir / "metrics.json").read_bytes()).hexdigest()

    def forge(row: VersionRow) -> None:
        next(a for a in row.artifacts if a.path == "metrics.json").sha256 = sha
        row.metrics = forged

    _edit_version(registry, 2, forge)
    assert registry.get("support-intents", 2).artifacts["metrics.json"] == sha  # the tables agree with the file
    problems = _problems(registry, "support-intents:2")
    recorded = version.artifacts["metrics.json"]
    assert problems == [
        f"metrics.json: sha256 {sha[:12]}… differs from {recorded[:12]}… recorded at registration",
        f"artifacts table: metrics.json sha256 {sha[:12]}… differs from {recorded[:12]}… in register entry #4",
        "metrics: the database's copy differs from the hash in register entry #4",
    ]
    assert registry.verify("support-intents", 1).ok


def test_verify_finds_edited_metrics_recipe_and_lineage_columns(registry, tmp_path):
    _in_production(registry, tmp_path)

    def edit(row: VersionRow) -> None:
        row.metrics = {**row.metrics, "tuned": {**row.metrics["tuned"], "accuracy": 0.99}}
        row.recipe = {**row.recipe, "base_model": "another-model"}
        row.lineage = {**row.lineage, "data": []}  # hides the inputs from verify's rehashing

    _edit_version(registry, 1, edit)
    assert sorted(p.split(":")[0] for p in _problems(registry, "support-intents:1")) == ["lineage", "metrics", "recipe"]


def test_verify_finds_an_added_or_removed_artifact_row(registry, tmp_path):
    _in_production(registry, tmp_path)
    _edit_version(registry, 1, lambda row: row.artifacts.remove(next(a for a in row.artifacts if a.path == "lineage.json")))
    assert _problems(registry, "support-intents:1") == [
        "artifacts table: the row of lineage.json is missing (register entry #1 records it)"]


def test_verify_checks_each_stage_against_the_audit_log(registry, tmp_path):
    _in_production(registry, tmp_path)
    version = registry.register(make_run(tmp_path))
    registry.promote(version.name, 3, "staging")
    registry.promote(version.name, 3, "production")
    registry.rollback(version.name, reason="complaints")  # entry 10: 2 production again, 3 archived
    registry.register(make_run(tmp_path))
    registry.promote(version.name, 4, "staging")
    registry.promote(version.name, 4, "archived", reason="pulled before release")
    registry.delete(version.name, 1, reason="superseded")
    registry.register(make_run(tmp_path))  # entry 15: 5, a candidate
    assert registry.verify().ok  # what the registry itself did is what the log says

    _edit_version(registry, 2, lambda row: setattr(row, "stage", "archived"))
    assert _problems(registry, "support-intents:2") == [
        "stage archived in the database, but the audit log leaves it production (entry #10)"]
    _edit_version(registry, 2, lambda row: setattr(row, "stage", "production"))
    _edit_version(registry, 5, lambda row: setattr(row, "stage", "staging"))
    assert _problems(registry, "support-intents:5") == [
        "stage staging in the database, but the audit log leaves it candidate (entry #15)"]


def test_verify_finds_a_changed_rollback_target(registry, tmp_path):
    _in_production(registry, tmp_path)
    registry.promote("support-intents", 2, "archived", reason="pulled")
    _edit_version(registry, 2, lambda row: setattr(row, "production_seq", 99))  # rollback would restore 2, not 1
    [problem] = _problems(registry, "support-intents:2")
    assert problem.startswith("production_seq 99 in the database, None by the audit log")


def test_verify_finds_versions_added_or_removed_behind_the_registrys_back(registry, tmp_path):
    _in_production(registry, tmp_path)
    with registry.db.writing() as session:
        session.delete(session.scalar(select(VersionRow).where(VersionRow.version == 1)))
    report = registry.verify()
    assert not report.ok
    [missing] = [check for check in report.versions if check.ref == "support-intents:1"]
    assert missing.problems == ["missing from the database: register entry #1 registered it and no entry deleted it"]
    assert not registry.verify("support-intents").ok

    with registry.db.writing() as session:
        row = session.scalar(select(VersionRow).where(VersionRow.version == 2))
        row.version = 1  # the old number on another run: the chain registered 1 from another directory
    problems = _problems(registry, "support-intents:1")
    assert any(p.startswith("run directory ") for p in problems) and any(p.startswith("artifacts table") for p in problems)

    _edit_version(registry, 1, lambda row: setattr(row, "version", 7))  # a number the registry never gave out
    assert _problems(registry, "support-intents:7")[-1].startswith("no register entry in the audit log")


def _rewrite_chain_without_record_hashes(registry: Registry) -> None:
    """Make the log look like one written before register entries carried the record hashes:
    the same entries, each rehashed and linked again, as that older registry would have them."""
    with registry.db.writing() as session:
        previous = GENESIS
        for row in session.scalars(select(AuditRow).order_by(AuditRow.seq)):
            details = json.loads(row.details)
            details.pop("records_sha256", None)
            row.details, row.prev_hash = canonical_json(details), previous
            row.hash = previous = entry_hash(row)
        session.get(AuditHead, HEAD_ID).hash = previous


def test_register_entries_without_record_hashes_still_verify_and_fall_back_to_the_files(registry, tmp_path):
    _in_production(registry, tmp_path)
    assert "records_sha256" in registry.audit()[0].details
    _rewrite_chain_without_record_hashes(registry)
    assert "records_sha256" not in registry.audit()[0].details
    assert registry.verify().ok

    _edit_version(registry, 1, lambda row: setattr(row, "metrics", {**row.metrics, "eval_rows": 4000}))
    assert _problems(registry, "support-intents:1") == [
        "metrics: the database's copy differs from metrics.json as registered (register entry #1)"]
