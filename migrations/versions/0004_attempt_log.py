"""Request rows record every upstream attempt, whether the balancer was in panic mode, and estimated usage.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        # JSON text: [{"key": id, "status": 429, "error": "...", "ms": 12.3}, ...] in attempt order.
        batch.add_column(sa.Column("attempt_log", sa.Text(), nullable=True))
        batch.add_column(sa.Column("panic", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(
            sa.Column("usage_estimated", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("usage_estimated")
        batch.drop_column("panic")
        batch.drop_column("attempt_log")
