"""The registry's first schema: models, versions, artifacts, the audit log and its head.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PRODUCTION_ONLY = sa.text("stage = 'production'")


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("last_version", sa.Integer, nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), sa.ForeignKey("registered_models.name"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(20), nullable=False),
        sa.Column("run_dir", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.Column("task", sa.String(40), nullable=False),
        sa.Column("registered_at", sa.String(40), nullable=False),
        sa.Column("registered_by", sa.String(200), nullable=False),
        sa.Column("production_seq", sa.Integer, nullable=True),
        sa.Column("recipe", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("lineage", sa.JSON, nullable=False),
        sa.UniqueConstraint("name", "version"),
    )
    op.create_index("ix_model_versions_name", "model_versions", ["name"])
    op.create_index("one_production_per_name", "model_versions", ["name"], unique=True,
                    sqlite_where=PRODUCTION_ONLY, postgresql_where=PRODUCTION_ONLY)
    op.create_table(
        "artifacts",
        sa.Column("version_id", sa.Integer, sa.ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("path", sa.String(500), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("time", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("audit_head", "audit_log", "artifacts", "model_versions", "registered_models"):
        op.drop_table(table)
