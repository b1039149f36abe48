"""The initial schema: users, providers, keys, pools, request history, prices and the config version.

Revision ID: 0001
Revises:
Create Date: 2026-11-01

Self-contained on purpose (no imports from trioproxy): a migration must keep describing the schema of its day
even after the models move on. It runs unchanged on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
# Exact money on both dialects: SQLite's NUMERIC affinity would store binary floats, so it gets decimal text.
MONEY = sa.Numeric(20, 10).with_variant(sa.String(22), "sqlite")
BUDGET = sa.Numeric(18, 6).with_variant(sa.String(20), "sqlite")


def _stamps() -> list[sa.Column]:
    return [sa.Column("created_at", TS, nullable=False), sa.Column("updated_at", TS, nullable=False)]


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(100), nullable=False),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("role", sa.String(32), nullable=False, server_default="user"),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("token_version", sa.Integer(), nullable=False, server_default="0"),
        *_stamps(),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "providers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("base_url", sa.String(2048), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("connect_timeout", sa.Float(), nullable=True),
        sa.Column("first_byte_timeout", sa.Float(), nullable=True),
        sa.Column("idle_timeout", sa.Float(), nullable=True),
        sa.Column("total_timeout", sa.Float(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        *_stamps(),
        sa.UniqueConstraint("name", name="uq_providers_name"),
        sa.CheckConstraint("kind IN ('openai', 'anthropic', 'gemini')", name="ck_providers_kind"),
    )
    op.create_table(
        "provider_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column(
            "provider_id", sa.Integer(), sa.ForeignKey("providers.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("secret_ciphertext", sa.Text(), nullable=False),
        sa.Column("secret_hint", sa.String(32), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("state", sa.String(32), nullable=False, server_default="active"),
        sa.Column("rpm_limit", sa.Integer(), nullable=True),
        sa.Column("tpm_limit", sa.Integer(), nullable=True),
        sa.Column("rpd_limit", sa.Integer(), nullable=True),
        *_stamps(),
        sa.UniqueConstraint("provider_id", "name", name="uq_provider_keys_provider_name"),
        sa.CheckConstraint("weight >= 0", name="ck_provider_keys_weight"),
    )
    op.create_index("ix_provider_keys_owner_id", "provider_keys", ["owner_id"])
    op.create_index("ix_provider_keys_provider_id", "provider_keys", ["provider_id"])
    op.create_table(
        "gateway_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column(
            "provider_id", sa.Integer(), sa.ForeignKey("providers.id", ondelete="RESTRICT"), nullable=False
        ),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("key_prefix", sa.String(32), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False, server_default="round_robin"),
        sa.Column("retry_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("first_byte_timeout", sa.Float(), nullable=True),
        sa.Column("total_timeout", sa.Float(), nullable=True),
        sa.Column("rpm_limit", sa.Integer(), nullable=True),
        sa.Column("tpm_limit", sa.Integer(), nullable=True),
        sa.Column("rpd_limit", sa.Integer(), nullable=True),
        sa.Column("daily_token_limit", sa.BigInteger(), nullable=True),
        sa.Column("daily_cost_limit", BUDGET, nullable=True),
        sa.Column("budget", BUDGET, nullable=True),
        sa.Column("budget_period", sa.String(16), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("allowed_models", sa.JSON(), nullable=True),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("last_used_at", TS, nullable=True),
        *_stamps(),
        sa.UniqueConstraint("key_hash", name="uq_gateway_keys_key_hash"),
        sa.CheckConstraint("retry_count >= 0", name="ck_gateway_keys_retry_count"),
    )
    op.create_index("ix_gateway_keys_owner_id", "gateway_keys", ["owner_id"])
    op.create_index("ix_gateway_keys_provider_id", "gateway_keys", ["provider_id"])
    op.create_table(
        "gateway_key_pool",
        sa.Column(
            "gateway_key_id",
            sa.Integer(),
            sa.ForeignKey("gateway_keys.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "provider_key_id",
            sa.Integer(),
            sa.ForeignKey("provider_keys.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer(), nullable=False),
    )
    op.create_index("ix_gateway_key_pool_provider_key_id", "gateway_key_pool", ["provider_key_id"])
    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("gateway_key_id", sa.Integer(), nullable=True),
        sa.Column("provider_key_id", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("provider_id", sa.Integer(), nullable=True),
        sa.Column("provider_kind", sa.String(16), nullable=True),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("usage_reported", sa.Boolean(), nullable=False),
        sa.Column("usage_complete", sa.Boolean(), nullable=False),
        sa.Column("usage_partial", sa.Boolean(), nullable=False),
        sa.Column("cost_input", MONEY, nullable=True),
        sa.Column("cost_output", MONEY, nullable=True),
        sa.Column("cost_cache_read", MONEY, nullable=True),
        sa.Column("cost_cache_write", MONEY, nullable=True),
        sa.Column("cost_total", MONEY, nullable=True),
        sa.Column("price_missing", sa.Boolean(), nullable=False),
        sa.Column("ttfb_ms", sa.Float(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_requests_started_at", "requests", ["started_at"])
    op.create_index("ix_requests_gateway_key_id_started_at", "requests", ["gateway_key_id", "started_at"])
    op.create_index("ix_requests_user_id_started_at", "requests", ["user_id", "started_at"])
    op.create_table(
        "model_prices",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("provider_kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("input_per_million", MONEY, nullable=False),
        sa.Column("output_per_million", MONEY, nullable=False),
        sa.Column("cache_read_per_million", MONEY, nullable=True),
        sa.Column("cache_write_per_million", MONEY, nullable=True),
        sa.Column("tiers", sa.JSON(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("provider_kind", "model", name="uq_model_prices_kind_model"),
    )
    config_version = op.create_table(
        "config_version",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_config_version_single_row"),
    )
    op.bulk_insert(config_version, [{"id": 1, "version": 1}])


def downgrade() -> None:
    for table in (
        "config_version",
        "model_prices",
        "requests",
        "gateway_key_pool",
        "gateway_keys",
        "provider_keys",
        "providers",
        "users",
    ):
        op.drop_table(table)
