"""The versions as the audit chain recorded them, and ``verify``'s check of the tables against it.

The tables (model_versions, artifacts) can be edited like any other rows, and a forger who edits a
file, its row in ``artifacts`` and the metrics together leaves nothing that disagrees among them.
The chain is harder to edit unseen (``domaintune.registry.audit``), so ``verify`` replays it: each
register entry holds the sha256 of every artifact (and, since they were added, of the recipe,
metrics and lineage as stored), and the promote, rollback and delete entries after it say which
stage the version is in. Any table that disagrees with that replay is a problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.catalog import sha256_file
from domaintune.registry.artifacts import check_artifacts, load_record
from domaintune.registry.audit import AuditEntry, canonical_json

if TYPE_CHECKING:
    from domaintune.registry.store import ModelVersion

RECORD_FILES = {"recipe": "recipe.yaml", "metrics": "metrics.json", "lineage": "lineage.json"}


def record_sha256(value: dict[str, Any]) -> str:
    """sha256 of a JSON column's value as the database gives it back (keys become text)."""
    return hashlib.sha256(canonical_json(json.loads(json.dumps(value))).encode("utf-8")).hexdigest()


def record_hashes(recipe: dict[str, Any], metrics: dict[str, Any], lineage: dict[str, Any]) -> dict[str, str]:
    """What a register entry records of the version's recipe, metrics and lineage columns."""
    return {"recipe": record_sha256(recipe), "metrics": record_sha256(metrics), "lineage": record_sha256(lineage)}


@dataclass
class Recorded:
    """One version as the audit chain describes it."""

    register_seq: int
    run_dir: str | None
    run_id: str | None
    artifacts: dict[str, str] | None  # relative path → sha256
    records: dict[str, str] | None  # None in register entries written before these hashes were
    stage: str = "candidate"
    stage_seq: int = 0  # the entry that put it in ``stage``
    production_seq: int | None = None  # as VersionRow.production_seq: what rollback returns to

    def move(self, stage: str, seq: int) -> None:
        self.stage, self.stage_seq = stage, seq


def replay(entries: Iterable[AuditEntry]) -> dict[str, Recorded]:
    """Each version the chain registered and did not delete, by ref, after every entry (oldest first)."""
    versions: dict[str, Recorded] = {}
    for entry in entries:
        details = entry.details
        if entry.action == "register":
            versions[entry.target] = Recorded(entry.seq, details.get("run_dir"), details.get("run_id"),
                                              details.get("artifacts"), details.get("records_sha256"), stage_seq=entry.seq)
        elif entry.action == "promote":
            if (replaced := versions.get(details.get("replaced"))) is not None:
                replaced.move("archived", entry.seq)  # keeps its production_seq, like Registry.promote
            if (promoted := versions.get(entry.target)) is not None:
                promoted.move(details["to"], entry.seq)
                promoted.production_seq = entry.seq if details["to"] == "production" else None
        elif entry.action == "rollback":
            if (current := versions.get(f"{entry.target}:{details.get('from')}")) is not None:
                current.move("archived", entry.seq)
                current.production_seq = None
            if (restored := versions.get(f"{entry.target}:{details.get('to')}")) is not None:
                restored.move("production", entry.seq)
        elif entry.action == "delete":
            versions.pop(entry.target, None)
    return versions


def check_version(version: ModelVersion, production_seq: int | None, recorded: Recorded | None) -> list[str]:
    """The version's files and rows against what the chain recorded; one line per problem."""
    if recorded is None:
        return [*check_artifacts(version.run_dir, version.artifacts),
                "no register entry in the audit log: it was not registered through the registry, "
                "or it was deleted and put back"]
    entry = f"register entry #{recorded.register_seq}"
    # The files are checked against the chain's hashes, so that a file and its row in the
    # artifacts table edited together are still found.
    problems = check_artifacts(version.run_dir, recorded.artifacts if recorded.artifacts is not None else version.artifacts)
    problems += _table_problems(version.artifacts, recorded.artifacts or {}, entry)
    for what, value, registered in (("run directory", str(version.run_dir), recorded.run_dir),
                                    ("run id", version.run_id, recorded.run_id)):
        if registered is not None and value != registered:
            problems.append(f"{what} {value} in the database, {registered} in {entry}")
    problems += _record_problems(version, recorded, entry)
    if version.stage != recorded.stage:
        problems.append(f"stage {version.stage} in the database, but the audit log leaves it {recorded.stage} "
                        f"(entry #{recorded.stage_seq})")
    if production_seq != recorded.production_seq:
        problems.append(f"production_seq {production_seq} in the database, {recorded.production_seq} by the audit log "
                        "(it decides which version a rollback restores)")
    return problems


def _table_problems(table: dict[str, str], chain: dict[str, str], entry: str) -> list[str]:
    problems = []
    for rel in sorted(table.keys() | chain.keys()):
        if rel not in chain:
            problems.append(f"artifacts table: {rel} has a row that {entry} does not record")
        elif rel not in table:
            problems.append(f"artifacts table: the row of {rel} is missing ({entry} records it)")
        elif table[rel] != chain[rel]:
            problems.append(f"artifacts table: {rel} sha256 {table[rel][:12]}… differs from {chain[rel][:12]}… "
                            f"in {entry}")
    return problems


def _record_problems(version: ModelVersion, recorded: Recorded, entry: str) -> list[str]:
    """The recipe, metrics and lineage columns against their hashes in the register entry, or,
    for an entry from before those were recorded, against their files where those are intact."""
    problems = []
    stored = {"recipe": version.recipe, "metrics": version.metrics, "lineage": version.lineage}
    for key, value in stored.items():
        if recorded.records and key in recorded.records:
            if record_sha256(value) != recorded.records[key]:
                problems.append(f"{key}: the database's copy differs from the hash in {entry}")
        elif _intact(version.run_dir / RECORD_FILES[key], (recorded.artifacts or {}).get(RECORD_FILES[key])):
            if record_sha256(value) != record_sha256(load_record(version.run_dir / RECORD_FILES[key])):
                problems.append(f"{key}: the database's copy differs from {RECORD_FILES[key]} as registered ({entry})")
    return problems


def _intact(file: Path, sha256: str | None) -> bool:
    return sha256 is not None and file.is_file() and sha256_file(file) == sha256
