"""Limits: a budget per user across all their keys, and an index for seeding provider-key counters.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-09

Gateway keys and provider keys got their limit columns in 0001; users get ``budget`` (USD, exact) and
``budget_period`` (``daily``, ``weekly``, ``monthly`` or NULL for a lifetime budget). The limiter seeds its
per-day counters of a provider key from ``requests`` on start (``provider_key_id`` and ``started_at``), the way
the two existing indexes serve gateway keys and users.

Self-contained like 0001 (no imports from trioproxy); runs unchanged on SQLite and PostgreSQL (SQLite supports
ADD COLUMN for nullable columns without a table copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Exact money on both dialects, as in 0001.
BUDGET = sa.Numeric(18, 6).with_variant(sa.String(20), "sqlite")


def upgrade() -> None:
    op.add_column("users", sa.Column("budget", BUDGET, nullable=True))
    op.add_column("users", sa.Column("budget_period", sa.String(16), nullable=True))
    op.create_index("ix_requests_provider_key_id_started_at", "requests", ["provider_key_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_requests_provider_key_id_started_at", table_name="requests")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("budget_period")
        batch.drop_column("budget")
