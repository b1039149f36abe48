"""The ``requests`` table: batch inserts from the metering writer, and reads for usage reports.

Inserts are idempotent (``INSERT ... ON CONFLICT (request_id) DO NOTHING`` on both dialects): the metering
writer may replay a batch from its spool after a crash or a lost commit acknowledgement, and a replay must not
count a request twice. A batch is one transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from trioproxy.errors import ConfigError
from trioproxy.records import RequestRecord
from trioproxy.store.db import write_transaction
from trioproxy.store.models import RequestRow

_REQUESTS = cast(sa.Table, RequestRow.__table__)


def record_to_row(r: RequestRecord) -> dict[str, Any]:
    """The column values of one record (timestamps aware UTC, costs exact decimals or None)."""
    cost = r.cost
    return {
        "request_id": r.request_id,
        "started_at": dt.datetime.fromtimestamp(r.started_at, dt.UTC),
        "gateway_key_id": r.gateway_key_id,
        "provider_key_id": r.provider_key_id,
        "user_id": r.user_id,
        "provider_id": r.provider_id,
        "provider_kind": r.provider_kind,
        "route": r.route,
        "method": r.method,
        "path": r.path,
        "model": r.model,
        "stream": r.stream,
        "status": r.status,
        "outcome": r.outcome.value,
        "input_tokens": r.usage.input_tokens,
        "output_tokens": r.usage.output_tokens,
        "cache_read_tokens": r.usage.cache_read_tokens,
        "cache_write_tokens": r.usage.cache_write_tokens,
        "reasoning_tokens": r.usage.reasoning_tokens,
        "usage_reported": r.usage.reported,
        "usage_complete": r.usage.complete,
        "usage_partial": r.usage_partial,
        "cost_input": None if cost is None else cost.input,
        "cost_output": None if cost is None else cost.output,
        "cost_cache_read": None if cost is None else cost.cache_read,
        "cost_cache_write": None if cost is None else cost.cache_write,
        "cost_total": None if cost is None else cost.total,
        "price_missing": r.price_missing,
        "ttfb_ms": r.ttfb_ms,
        "duration_ms": r.duration_ms,
        "attempts": r.attempts,
        "client_ip": r.client_ip,
        "error": r.error,
        "attempt_log": r.attempt_log,
        "panic": r.panic,
        "usage_estimated": r.usage_estimated,
    }


def row_to_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored row as JSON-ready values: ISO-8601 timestamps, decimals as strings (never floats)."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, dt.datetime):
            out[name] = value.isoformat()
        elif isinstance(value, Decimal):
            # Plain and canonical on both dialects: PostgreSQL's NUMERIC(20, 10) zero would read "0E-10".
            out[name] = format(value.normalize(), "f")
        else:
            out[name] = value
    return out


class _BatchInsert:
    """``INSERT ... ON CONFLICT (request_id) DO NOTHING`` compiled once per dialect and run with the driver's
    ``executemany``.

    Why not ``conn.execute(stmt, rows)``: SQLAlchemy's per-execution machinery cost ~20 µs a row, and this
    runs for every proxied request, in a thread that competes with the event loop for the GIL. The values still
    go through SQLAlchemy's own bind processors (timestamps, exact decimals), so nothing about how a value is
    stored is written twice.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        if dialect.name == "postgresql":
            stmt: Any = postgresql.insert(_REQUESTS).on_conflict_do_nothing(index_elements=["request_id"])
        elif dialect.name == "sqlite":
            stmt = sqlite.insert(_REQUESTS).on_conflict_do_nothing(index_elements=["request_id"])
        else:
            raise ConfigError(f"unsupported database dialect {dialect.name!r}: use SQLite or PostgreSQL")
        columns = list(_REQUESTS.columns)
        compiled = stmt.values({c.name: sa.bindparam(c.name, type_=c.type) for c in columns}).compile(
            dialect=dialect
        )
        self.sql = str(compiled)
        self.positional = compiled.positiontup is not None
        self.order = list(compiled.positiontup or [c.name for c in columns])
        processors = {c.name: c.type._cached_bind_processor(dialect) for c in columns}
        self.processors = [(name, processors.get(name)) for name in self.order]

    def parameters(self, row: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = [row.get(name) if proc is None else proc(row.get(name)) for name, proc in self.processors]
        return tuple(values) if self.positional else dict(zip(self.order, values, strict=True))


def insert_request_records(engine: Engine, records: Sequence[RequestRecord]) -> int:
    """Insert a batch in one transaction; rows whose request_id is already stored are skipped.

    Returns the number of rows actually inserted (the driver's executemany rowcount: the sum over the rows,
    where a skipped conflict counts 0, on both sqlite3 and psycopg).
    """
    if not records:
        return 0
    batch = _BatchInsert(engine.dialect)  # compiling costs ~1 ms a batch: not worth a cache
    params: Any = [batch.parameters(record_to_row(record)) for record in records]
    with write_transaction(engine) as conn:
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(batch.sql, params)
            inserted = cursor.rowcount
        finally:
            cursor.close()
    return max(0, int(inserted))


def recent_requests(engine: Engine, last: int = 20) -> list[dict[str, Any]]:
    """The ``last`` most recent requests, newest first, JSON-ready."""
    stmt = (
        sa.select(_REQUESTS)
        .order_by(_REQUESTS.c.started_at.desc(), _REQUESTS.c.request_id.desc())
        .limit(max(0, last))
    )
    with engine.connect() as conn:
        return [row_to_json(row) for row in conn.execute(stmt).mappings()]
