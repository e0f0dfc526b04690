"""The model registry: versions per model name, their stages, lineage and audit log.

Stages: candidate → staging → production → archived, one production version per name. Every
change is one transaction under the registry's write lock, audit entry included, so concurrent
processes never interleave half-done changes or fork the audit chain.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from domaintune.registry import audit as audit_log
from domaintune.registry import history
from domaintune.registry.artifacts import RECORDS, check_artifacts, check_inputs, read_run_dir
from domaintune.registry.database import Database
from domaintune.registry.diff import Change, diff_records
from domaintune.registry.errors import PromotionRefused, RegistryError
from domaintune.registry.policy import Decision, EvalRows, check_promotion, eval_rows_sha256, headline_metric
from domaintune.registry.schema import STAGES, ArtifactRow, RegisteredModel, VersionRow

TARGET_STAGES = ("staging", "production", "archived")


def current_actor() -> str:
    """Who is acting: ``$DOMAINTUNE_USER``, else the OS user name."""
    try:
        return os.environ.get("DOMAINTUNE_USER") or getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid-{os.getuid()}"


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """``NAME``, ``NAME:3`` or ``NAME:production`` → (name, 3 / "production" / None)."""
    name, _, version = ref.partition(":")
    if not name:
        raise RegistryError(f"no model name in {ref!r}", hint="write NAME or NAME:VERSION, e.g. support-intents:3")
    if not version:
        return name, None
    if version.isdigit():
        return name, int(version)
    if version in STAGES:
        return name, version
    raise RegistryError(f"bad version {version!r} in {ref!r}",
                        hint=f"a version is a number or a stage ({', '.join(STAGES)})")


@dataclass(frozen=True)
class ModelVersion:
    """One registered run of a model, as recorded at registration (plus its current stage)."""

    name: str
    version: int
    stage: str
    task: str
    run_dir: Path
    run_id: str
    registered_at: str
    registered_by: str
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    artifacts: dict[str, str]  # relative path → sha256 at registration

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def headline(self) -> tuple[str, float | None]:
        """The task's headline metric and the tuned model's value of it."""
        metric = headline_metric(self.task)
        return metric, self.metrics["tuned"].get(metric)

    @classmethod
    def from_row(cls, row: VersionRow) -> ModelVersion:
        return cls(row.name, row.version, row.stage, row.task, Path(row.run_dir), row.run_id, row.registered_at,
                   row.registered_by, row.recipe, row.metrics, row.lineage, {a.path: a.sha256 for a in row.artifacts})


@dataclass(frozen=True)
class Promotion:
    """A stage change that happened: the version after it, what the policy said, and the version
    it replaced in production (if any)."""

    version: ModelVersion
    decision: Decision
    forced: bool
    replaced: ModelVersion | None = None


@dataclass(frozen=True)
class ArtifactCheck:
    ref: str
    run_dir: Path
    problems: list[str]
    inputs_absent: list[str] = field(default_factory=list)  # inputs not on this machine, so not rehashed


@dataclass(frozen=True)
class VerifyReport:
    """Artifact checks of the versions asked for, and the audit chain's check."""

    versions: list[ArtifactCheck]
    audit: audit_log.AuditReport

    @property
    def ok(self) -> bool:
        return self.audit.ok and not any(check.problems for check in self.versions)


class Registry:
    """The registry at ``url`` (default: ``$DOMAINTUNE_REGISTRY_URL``, else
    ``sqlite:///$DOMAINTUNE_HOME/registry.db``), created and migrated on first use.

    ``actor`` arguments default to ``current_actor()``.
    """

    def __init__(self, url: str | None = None):
        self.db = Database(url)
        self.url = self.db.url

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def list(self, name: str | None = None, stage: str | None = None) -> list[ModelVersion]:
        """All versions, by name then version; optionally of one name or in one stage."""
        query = select(VersionRow).order_by(VersionRow.name, VersionRow.version)
        if name is not None:
            query = query.where(VersionRow.name == name)
        if stage is not None:
            query = query.where(VersionRow.stage == _stage(stage))
        with self.db.reading() as session:
            return [ModelVersion.from_row(row) for row in session.scalars(query)]

    def require(self, name: str) -> None:
        """Raise the registry's error for a model name that was never registered."""
        with self.db.reading() as session:
            if session.get(RegisteredModel, name) is None:
                raise _unknown(name)

    def get(self, name: str, version: int | str | None = None) -> ModelVersion:
        """A version by number, the newest one in a stage (``"production"``, ``"staging"``, ...),
        or the newest of all when ``version`` is None."""
        with self.db.reading() as session:
            return ModelVersion.from_row(_find(session, name, version))

    def diff(self, a: ModelVersion, b: ModelVersion) -> list[Change]:
        """What differs between two versions: stage, task and run directory; the metrics (eval rows,
        base, tuned, intervals, gates); the recipe; the lineage (hashes, libraries, machine, timings)."""

        def record(v: ModelVersion) -> dict[str, dict[str, Any]]:
            return {"version": {"stage": v.stage, "task": v.task, "run_dir": str(v.run_dir)},
                    "metrics": {k: v.metrics.get(k) for k in ("eval_rows", "base", "tuned", "intervals", "gates")},
                    "recipe": v.recipe, "lineage": v.lineage}

        return diff_records(record(a), record(b))

    def audit(self, name: str | None = None) -> list[audit_log.AuditEntry]:
        """The audit log, oldest first; with ``name`` (or ``name:version``), only the entries about
        that model (or version). An unknown model name raises, as everywhere else."""
        query = select(audit_log.AuditRow).order_by(audit_log.AuditRow.seq)
        if name is not None:
            target = audit_log.AuditRow.target
            query = query.where((target == name) | target.startswith(f"{name}:", autoescape=True))
        with self.db.reading() as session:
            entries = [audit_log.AuditEntry.from_row(row) for row in session.scalars(query)]
        if name is not None and not entries:
            self.require(name.partition(":")[0])
        return entries

    def verify_audit(self) -> audit_log.AuditReport:
        """Walk the audit chain; see ``domaintune.registry.audit`` for what is detected."""
        with self.db.reading() as session:
            return audit_log.verify_chain(session)

    def verify(self, name: str | None = None, version: int | str | None = None) -> VerifyReport:
        """Check the chosen versions (all by default) against the audit chain and check the chain.

        For each version: the sha256 of every file recorded at registration, against the register
        entry's hashes; the artifacts table, recipe, metrics and lineage against that entry; the
        stage against the one the chain's promote/rollback entries leave it in (see
        ``domaintune.registry.history``); and the inputs (source data, base weights) where those
        are on this machine. Checking all versions also finds versions the chain registered that
        are gone from the database without a delete entry."""
        with self.db.reading() as session:  # one read transaction: the tables and the chain as of one moment
            if version is not None:
                rows = [_find(session, name, version)]
            else:
                query = select(VersionRow).order_by(VersionRow.name, VersionRow.version)
                rows = list(session.scalars(query if name is None else query.where(VersionRow.name == name)))
                if name is not None and not rows and session.get(RegisteredModel, name) is None:
                    raise _unknown(name)
            chosen = [(ModelVersion.from_row(row), row.production_seq) for row in rows]
            entries = session.scalars(select(audit_log.AuditRow).order_by(audit_log.AuditRow.seq))
            recorded = history.replay(audit_log.AuditEntry.from_row(row) for row in entries)
            chain = audit_log.verify_chain(session)
        checks = []
        for v, production_seq in chosen:
            input_problems, absent = check_inputs(v.lineage)
            problems = history.check_version(v, production_seq, recorded.get(v.ref))
            checks.append(ArtifactCheck(v.ref, v.run_dir, problems + input_problems, absent))
        if version is None:
            present = {v.ref for v, _ in chosen}
            for ref, r in recorded.items():
                if ref not in present and (name is None or ref.rpartition(":")[0] == name):
                    problem = f"missing from the database: register entry #{r.register_seq} registered it and no entry deleted it"
                    checks.append(ArtifactCheck(ref, Path(r.run_dir or "?"), [problem]))
        return VerifyReport(checks, chain)

    def require_unchanged(self, version: ModelVersion) -> None:
        """Raise unless every file recorded at ``version``'s registration is as it was: what is
        promoted, served or updated from must be what was registered, reviewed and gated, not
        merely what ``verify`` would have said if someone had run it."""
        problems = check_artifacts(version.run_dir, version.artifacts)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise RegistryError(f"{version.ref}'s run directory differs from what was registered: {shown}",
                                where=str(version.run_dir),
                                hint=f"`domaintune registry verify {version.ref}` lists every difference; restore the "
                                     "files, or train and register a new version")

    # -- changing --------------------------------------------------------------------------

    def register(self, run_dir: str | Path, *, actor: str | None = None) -> ModelVersion:
        """Record a finished run directory as the next candidate version of its recipe's name."""
        run = read_run_dir(run_dir)  # hashing happens before taking the write lock
        with self.db.writing() as session:
            model = session.get(RegisteredModel, run.name)
            if model is None:
                model = RegisteredModel(name=run.name, created_at=_now(), last_version=0)
                session.add(model)
            twin = session.scalar(select(VersionRow).where(VersionRow.name == run.name, VersionRow.run_id == run.run_id))
            if twin is not None:
                raise RegistryError(f"run {run.run_id} is already registered as {twin.name}:{twin.version}",
                                    where=str(run.path))
            model.last_version += 1
            row = VersionRow(name=run.name, version=model.last_version, stage="candidate", run_dir=str(run.path),
                             run_id=run.run_id, task=run.task, registered_at=_now(), registered_by=actor or current_actor(),
                             recipe=run.recipe, metrics=run.metrics, lineage=run.lineage,
                             artifacts=[ArtifactRow(path=a.path, sha256=a.sha256, bytes=a.bytes) for a in run.artifacts])
            session.add(row)
            session.flush()
            audit_log.append(session, actor=row.registered_by, action="register", target=f"{row.name}:{row.version}",
                             reason=None, details={"run_dir": row.run_dir, "run_id": row.run_id,
                                                   "artifacts": {a.path: a.sha256 for a in run.artifacts},
                                                   "records_sha256": history.record_hashes(run.recipe, run.metrics,
                                                                                           run.lineage)})
            registered = ModelVersion.from_row(row)
        return registered

    def promote(self, name: str, version: int | str, to: str, *, actor: str | None = None, force: bool = False,
                reason: str | None = None) -> Promotion:
        """Move a version to ``to`` (staging, production or archived) if the policy allows it
        (``domaintune.registry.policy``); a production version it replaces is archived.

        Raises ``PromotionRefused`` with the policy's reasons; ``force=True`` overrides them and
        needs a ``reason``, written to the audit log with the overridden refusals."""
        if to not in TARGET_STAGES:  # "candidate" too: a version is one only when registered
            known = "cannot promote to" if to in STAGES else "unknown stage"
            raise RegistryError(f"{known} {to!r}", hint=f"promote to {', '.join(TARGET_STAGES)}")
        if force and not (reason and reason.strip()):
            raise RegistryError("--force needs a justification", hint="add --reason '<why the policy is overridden>'")
        if to != "archived":
            self.require_unchanged(self.get(name, version))  # hashed before the write lock is taken
        with self.db.writing() as session:
            row = _find(session, name, version)
            ref = f"{row.name}:{row.version}"
            if row.stage == to:
                raise RegistryError(f"{ref} is already {to}")
            if row.stage == "production" and to != "archived":
                raise RegistryError(f"{ref} is in production", hint=f"promote another version, or `rollback {row.name}`")
            if row.stage == "production":  # archiving it leaves the name with nothing to serve
                _require_reason(reason, f"move of the production version {ref} to archived")
            current = _production(session, row.name) if to == "production" else None
            decision = Decision() if to == "archived" else check_promotion(
                row.stage, to, row.metrics, (f"{current.name}:{current.version}", current.metrics) if current else None,
                EvalRows(eval_rows_sha256(row.lineage), eval_rows_sha256(current.lineage), row.run_dir, current.run_dir)
                if current else None)
            actor = actor or current_actor()
            if not decision.allowed and not force:
                # The refusal is recorded too: the transaction commits, then the caller hears why.
                audit_log.append(session, actor=actor, action="promote-refused", target=ref, reason=reason,
                                 details={"from": row.stage, "to": to, "refusals": decision.refusals})
                refused = PromotionRefused(ref, to, decision.refusals,
                                           first=f"domaintune registry promote {ref} --to staging"
                                           if to == "production" and row.stage != "staging" else None)
            else:
                refused = None
                details: dict[str, Any] = {"from": row.stage, "to": to, "checks": decision.passed}
                if decision.refusals:
                    details["forced_over"] = decision.refusals
                replaced = None
                if current is not None:
                    current.stage = "archived"  # keeps production_seq: rollback returns to it
                    details["replaced"] = f"{current.name}:{current.version}"
                    session.flush()  # before the new one, or the one-production index would trip
                    replaced = ModelVersion.from_row(current)
                row.stage = to
                entry = audit_log.append(session, actor=actor, action="promote", target=ref, reason=reason,
                                         details=details)
                row.production_seq = entry.seq if to == "production" else None
                promoted = ModelVersion.from_row(row)
                promotion = {"actor": actor, "time": entry.time, "reason": reason}
        if refused is not None:
            raise refused
        _rewrite_card(promoted, promotion)
        if replaced is not None:
            _rewrite_card(replaced, {**promotion, "reason": f"replaced in production by {ref}"
                                     + (f": {reason}" if reason else "")})
        return Promotion(promoted, decision, bool(decision.refusals), replaced)

    def rollback(self, name: str, *, actor: str | None = None, reason: str) -> ModelVersion:
        """Archive the production version of ``name`` and restore the one it replaced (the most
        recently promoted version that is archived and did not leave production by a rollback)."""
        _require_reason(reason, "rollback")
        with self.db.writing() as session:
            current = _production(session, name)
            previous = session.scalar(
                select(VersionRow).where(VersionRow.name == name, VersionRow.stage == "archived",
                                         VersionRow.production_seq.is_not(None))
                .order_by(VersionRow.production_seq.desc()).limit(1))
            if previous is None:
                if current is None and not session.get(RegisteredModel, name):
                    raise _unknown(name)
                raise RegistryError(f"{name} has no earlier production version to roll back to")
            self.require_unchanged(ModelVersion.from_row(previous))
            if current is not None:
                current.stage, current.production_seq = "archived", None
                session.flush()
            previous.stage = "production"
            entry = audit_log.append(session, actor=actor or current_actor(), action="rollback", target=name,
                                     reason=reason, details={"from": current.version if current else None,
                                                             "to": previous.version})
            restored = ModelVersion.from_row(previous)
            archived = ModelVersion.from_row(current) if current is not None else None
            change = {"actor": entry.actor, "time": entry.time}
        _rewrite_card(restored, {**change, "reason": f"restored by a rollback: {reason}"})
        if archived is not None:
            _rewrite_card(archived, {**change, "reason": f"rolled back: {reason}"})
        return restored

    def delete(self, name: str, version: int | str, *, actor: str | None = None, reason: str) -> ModelVersion:
        """Remove a version that is not in production from the registry (its files stay on disk);
        the audit log keeps its record."""
        _require_reason(reason, "delete")
        with self.db.writing() as session:
            row = _find(session, name, version)
            deleted = ModelVersion.from_row(row)
            if row.stage == "production":
                raise RegistryError(f"{deleted.ref} is in production", hint="promote another version or roll back first")
            session.delete(row)
            audit_log.append(session, actor=actor or current_actor(), action="delete", target=deleted.ref,
                             reason=reason, details={"stage": row.stage, "run_dir": row.run_dir, "run_id": row.run_id})
        return deleted

    def record(self, action: str, target: str, *, actor: str | None = None, reason: str | None = None,
               details: dict[str, Any] | None = None) -> audit_log.AuditEntry:
        """Append an audit entry for something done outside the registry, such as a deployment
        (``action="deploy"``, ``target="name:version"``)."""
        if action not in audit_log.ACTIONS:
            raise RegistryError(f"unknown audit action {action!r}", hint=f"use one of {', '.join(audit_log.ACTIONS)}")
        with self.db.writing() as session:
            row = audit_log.append(session, actor=actor or current_actor(), action=action, target=target,
                                   reason=reason, details=details or {})
            entry = audit_log.AuditEntry.from_row(row)
        return entry


def _rewrite_card(version: ModelVersion, change: dict[str, Any]) -> None:
    """The model card says which stage the version is in and who put it there (``change``: actor,
    time, reason), so every version whose stage changes gets it rewritten. It is not among the
    hashed artifacts, so rewriting it does not trip ``verify``. A run directory that is gone
    (moved, cleaned up) has no card to keep current: the stage change stands without it."""
    from domaintune.registry.model_card import write_model_card

    if all((version.run_dir / name).is_file() for name in RECORDS):
        write_model_card(version.run_dir, {"name": version.name, "version": version.version, "stage": version.stage,
                                           **change})


def register_run(run_dir: str | Path, registry_url: str | None = None) -> ModelVersion:
    """Register a finished run directory as a new candidate version (what ``domaintune run`` does)."""
    with Registry(registry_url) as registry:
        return registry.register(run_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}", hint=f"use one of {', '.join(STAGES)}")
    return stage


def _require_reason(reason: str | None, what: str) -> None:
    if not (reason and reason.strip()):
        raise RegistryError(f"a {what} needs a reason", hint="add --reason '<why>' (it goes into the audit log)")


def _unknown(name: str) -> RegistryError:
    return RegistryError(f"no model named {name!r} in the registry", hint="`domaintune registry list` shows the names")


def _production(session: Session, name: str) -> VersionRow | None:
    return session.scalar(select(VersionRow).where(VersionRow.name == name, VersionRow.stage == "production"))


def _find(session: Session, name: str, version: int | str | None) -> VersionRow:
    query = select(VersionRow).where(VersionRow.name == name)
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, int):
        query = query.where(VersionRow.version == version)
    elif version is not None:
        query = query.where(VersionRow.stage == _stage(version))
    row = session.scalar(query.order_by(VersionRow.version.desc()).limit(1))
    if row is not None:
        return row
    if session.get(RegisteredModel, name) is None:
        raise _unknown(name)
    known = ", ".join(str(v) for v in session.scalars(select(VersionRow.version).where(VersionRow.name == name)))
    raise RegistryError(f"{name} has no version {version}", hint=f"its versions: {known or 'none'}")
