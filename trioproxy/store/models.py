"""The storage schema, as SQLAlchemy 2 typed declarative models shared by both planes.

The tables are created by the Alembic migration in ``migrations/versions``; the models here must describe the
same schema (tests compare them). Timestamps are timezone-aware UTC on both dialects: SQLite has no time zone
type, so :class:`UTCDateTime` stores naive UTC there and hands back aware values. Money is exact on both
dialects: ``NUMERIC`` on PostgreSQL, and decimal text on SQLite (whose NUMERIC affinity would turn it into a binary
float); see :class:`ExactDecimal`.

The ``requests`` table has no foreign keys on purpose: usage history must outlive the keys, users and
providers it mentions.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the dialect stores."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        # SQLite's DATETIME keeps no offset; store the UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class ExactDecimal(sa.TypeDecorator[Decimal]):
    """A Decimal that round-trips exactly: NUMERIC(p, s) on PostgreSQL, canonical decimal text on SQLite."""

    impl = sa.Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__(precision, scale, asdecimal=True)
        self.precision = precision
        self.scale = scale

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(self.precision + 2))
        return dialect.type_descriptor(sa.Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        exact = Decimal(value)
        if dialect.name == "sqlite":
            return format(exact.quantize(Decimal(1).scaleb(-self.scale)).normalize(), "f")
        return exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(str(value))


MONEY = ExactDecimal(20, 10)  # per-request costs and prices per million tokens
BUDGET = ExactDecimal(18, 6)  # limits and budgets in USD


class Base(DeclarativeBase):
    pass


def _created() -> Mapped[dt.datetime]:
    return mapped_column(UTCDateTime(), nullable=False, default=utcnow)


def _updated() -> Mapped[dt.datetime]:
    return mapped_column(UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (sa.UniqueConstraint("username", name="uq_users_username"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(100), nullable=False)
    email: Mapped[str | None] = mapped_column(sa.String(320))
    password_hash: Mapped[str | None] = mapped_column(sa.String(255))
    role: Mapped[str] = mapped_column(sa.String(32), nullable=False, default="user", server_default="user")
    enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True, server_default=sa.true())
    token_version: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0, server_default="0")
    # A spending cap across all of the user's gateway keys (USD); budget_period: daily/weekly/monthly or None.
    budget: Mapped[Decimal | None] = mapped_column(BUDGET)
    budget_period: Mapped[str | None] = mapped_column(sa.String(16))
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class Provider(Base):
    __tablename__ = "providers"
    __table_args__ = (
        sa.UniqueConstraint("name", name="uq_providers_name"),
        sa.CheckConstraint("kind IN ('openai', 'anthropic', 'gemini')", name="ck_providers_kind"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100), nullable=False)
    kind: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    base_url: Mapped[str] = mapped_column(sa.String(2048), nullable=False)
    headers: Mapped[dict[str, str]] = mapped_column(sa.JSON, nullable=False, default=dict)
    connect_timeout: Mapped[float | None] = mapped_column(sa.Float)
    first_byte_timeout: Mapped[float | None] = mapped_column(sa.Float)
    idle_timeout: Mapped[float | None] = mapped_column(sa.Float)
    total_timeout: Mapped[float | None] = mapped_column(sa.Float)
    enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True, server_default=sa.true())
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class ProviderKey(Base):
    __tablename__ = "provider_keys"
    __table_args__ = (
        sa.UniqueConstraint("provider_id", "name", name="uq_provider_keys_provider_name"),
        sa.CheckConstraint("weight >= 0", name="ck_provider_keys_weight"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider_id: Mapped[int] = mapped_column(
        sa.ForeignKey("providers.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(sa.String(100), nullable=False)
    secret_ciphertext: Mapped[str] = mapped_column(sa.Text, nullable=False)
    secret_hint: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    weight: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=1, server_default="1")
    enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True, server_default=sa.true())
    state: Mapped[str] = mapped_column(
        sa.String(32), nullable=False, default="active", server_default="active"
    )
    rpm_limit: Mapped[int | None] = mapped_column(sa.Integer)
    tpm_limit: Mapped[int | None] = mapped_column(sa.Integer)
    rpd_limit: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class GatewayKey(Base):
    __tablename__ = "gateway_keys"
    __table_args__ = (
        sa.UniqueConstraint("key_hash", name="uq_gateway_keys_key_hash"),
        sa.CheckConstraint("retry_count >= 0", name="ck_gateway_keys_retry_count"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(100), nullable=False)
    # RESTRICT: a provider still serving gateway keys cannot be deleted by accident.
    provider_id: Mapped[int] = mapped_column(
        sa.ForeignKey("providers.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    key_hash: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    key_prefix: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    strategy: Mapped[str] = mapped_column(
        sa.String(32), nullable=False, default="round_robin", server_default="round_robin"
    )
    retry_count: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0, server_default="0")
    first_byte_timeout: Mapped[float | None] = mapped_column(sa.Float)
    total_timeout: Mapped[float | None] = mapped_column(sa.Float)
    rpm_limit: Mapped[int | None] = mapped_column(sa.Integer)
    tpm_limit: Mapped[int | None] = mapped_column(sa.Integer)
    rpd_limit: Mapped[int | None] = mapped_column(sa.Integer)
    daily_token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    daily_cost_limit: Mapped[Decimal | None] = mapped_column(BUDGET)
    budget: Mapped[Decimal | None] = mapped_column(BUDGET)
    budget_period: Mapped[str | None] = mapped_column(sa.String(16))
    max_concurrency: Mapped[int | None] = mapped_column(sa.Integer)
    allowed_models: Mapped[list[str] | None] = mapped_column(sa.JSON)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True, server_default=sa.true())
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class GatewayKeyPool(Base):
    __tablename__ = "gateway_key_pool"

    gateway_key_id: Mapped[int] = mapped_column(
        sa.ForeignKey("gateway_keys.id", ondelete="CASCADE"), primary_key=True
    )
    provider_key_id: Mapped[int] = mapped_column(
        sa.ForeignKey("provider_keys.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(sa.Integer, nullable=False)


class RequestRow(Base):
    __tablename__ = "requests"
    __table_args__ = (
        sa.Index("ix_requests_started_at", "started_at"),
        # Leading columns serve lookups by key or user; started_at second serves their daily windows.
        sa.Index("ix_requests_gateway_key_id_started_at", "gateway_key_id", "started_at"),
        sa.Index("ix_requests_user_id_started_at", "user_id", "started_at"),
        sa.Index("ix_requests_provider_key_id_started_at", "provider_key_id", "started_at"),
    )

    request_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    gateway_key_id: Mapped[int | None] = mapped_column(sa.Integer)
    provider_key_id: Mapped[int | None] = mapped_column(sa.Integer)
    user_id: Mapped[int | None] = mapped_column(sa.Integer)
    provider_id: Mapped[int | None] = mapped_column(sa.Integer)
    provider_kind: Mapped[str | None] = mapped_column(sa.String(16))
    route: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    method: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    path: Mapped[str] = mapped_column(sa.String(2048), nullable=False)
    model: Mapped[str | None] = mapped_column(sa.String(255))
    stream: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    status: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    outcome: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    input_tokens: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    cache_read_tokens: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    usage_reported: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    usage_complete: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    usage_partial: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    cost_input: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_output: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_cache_read: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_cache_write: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_total: Mapped[Decimal | None] = mapped_column(MONEY)
    price_missing: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    ttfb_ms: Mapped[float | None] = mapped_column(sa.Float)
    duration_ms: Mapped[float | None] = mapped_column(sa.Float)
    attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    client_ip: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[str | None] = mapped_column(sa.Text)
    attempt_log: Mapped[str | None] = mapped_column(sa.Text)  # JSON list, one object per upstream attempt
    panic: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())
    usage_estimated: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())


class ModelPriceRow(Base):
    __tablename__ = "model_prices"
    __table_args__ = (sa.UniqueConstraint("provider_kind", "model", name="uq_model_prices_kind_model"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    provider_kind: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    model: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    input_per_million: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    output_per_million: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cache_read_per_million: Mapped[Decimal | None] = mapped_column(MONEY)
    cache_write_per_million: Mapped[Decimal | None] = mapped_column(MONEY)
    # [{"min_input_tokens": 200000, "input_per_million": "2.5", ...}]: decimals as strings, never floats.
    tiers: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON, nullable=False, default=list)
    updated_at: Mapped[dt.datetime] = _updated()


class AuditLog(Base):
    """One mutating admin call, with masked before/after images (store/audit.py writes it).

    Append-only: the migration installs triggers that refuse UPDATE and DELETE. No foreign keys, like
    ``requests``: the trail must outlive the users and objects it names.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        sa.Index("ix_audit_log_at", "at"),
        sa.Index("ix_audit_log_actor_id_at", "actor_id", "at"),
        sa.Index("ix_audit_log_object_type_at", "object_type", "at"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    actor_id: Mapped[int | None] = mapped_column(sa.Integer)
    actor_name: Mapped[str | None] = mapped_column(sa.String(100))
    action: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    object_type: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    object_id: Mapped[str | None] = mapped_column(sa.String(128))
    before: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON(none_as_null=True))
    after: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON(none_as_null=True))
    ip: Mapped[str | None] = mapped_column(sa.String(64))


class ConfigVersion(Base):
    __tablename__ = "config_version"
    __table_args__ = (sa.CheckConstraint("id = 1", name="ck_config_version_single_row"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
