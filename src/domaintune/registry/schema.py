"""The registry's tables. Times are UTC ISO-8601 text, so that they read and hash the same on every
backend. Changing a table means a new Alembic revision in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STAGES = ("candidate", "staging", "production", "archived")


class Base(DeclarativeBase):
    pass


class RegisteredModel(Base):
    """One row per model name; ``last_version`` numbers versions even after one is deleted."""

    __tablename__ = "registered_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[str] = mapped_column(String(40))
    last_version: Mapped[int] = mapped_column(Integer)


class VersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # The database itself keeps "one production version per name", whatever the code does.
        Index("one_production_per_name", "name", unique=True,
              sqlite_where=text("stage = 'production'"), postgresql_where=text("stage = 'production'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(ForeignKey("registered_models.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(20))
    run_dir: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(String(40))
    registered_at: Mapped[str] = mapped_column(String(40))
    registered_by: Mapped[str] = mapped_column(String(200))
    # Audit seq of the promotion that made this version production; NULL once it left production
    # other than by being replaced. The non-NULL ones, newest first, are what rollback returns to.
    production_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    recipe: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    lineage: Mapped[dict] = mapped_column(JSON)
    artifacts: Mapped[list[ArtifactRow]] = relationship(cascade="all, delete-orphan", order_by="ArtifactRow.path")


class ArtifactRow(Base):
    """A file of the run directory as it was at registration: what ``verify`` checks against."""

    __tablename__ = "artifacts"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(500), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)


class AuditRow(Base):
    """Append-only; ``hash`` covers every other column and the previous entry's hash."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(300))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON, hashed as stored
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's last seq and hash, written in the same transaction as each entry, so that
    deleting entries from the end of the log is noticed too."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
