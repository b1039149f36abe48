"""Spend so far, from the ``requests`` table: the database's answer to :class:`~trioproxy.limits.seed.SpendQuery`.

What counts: every row of the subject (gateway key, user or provider key) that started in the period and was not
refused by the gateway itself (``outcome != 'rejected'``): a request that reached the provider counts even when
the provider answered with an error. Tokens are input + output + cache read + cache write; cost is
``cost_total`` (rows without a price add nothing).

Blocking: run it with ``trio.to_thread.run_sync``. Rows still in the metering queue are not in the table yet;
they are at most a flush interval's worth (0.2 s) of traffic, plus what a crash lost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from trioproxy.limits.model import Measure, Scope, usd_to_nano
from trioproxy.limits.seed import SpendQuery
from trioproxy.store.db import read_transaction
from trioproxy.store.models import RequestRow

_REQUESTS = cast(sa.Table, RequestRow.__table__)


def database_spend(engine: Engine, queries: Sequence[SpendQuery]) -> list[int]:
    """The spend so far for each query, read in one transaction."""
    table = _REQUESTS
    subject_column = {
        Scope.GATEWAY_KEY: table.c.gateway_key_id,
        Scope.USER: table.c.user_id,
        Scope.PROVIDER_KEY: table.c.provider_key_id,
    }
    out: list[int] = []
    with read_transaction(engine) as conn:
        sqlite = conn.dialect.name == "sqlite"
        for query in queries:
            where = sa.and_(
                subject_column[query.scope] == query.subject_id,
                table.c.started_at >= dt.datetime.fromtimestamp(query.since, dt.UTC),
                table.c.outcome != "rejected",
            )
            if query.measure is Measure.REQUESTS:
                value = conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one()
                out.append(int(value))
            elif query.measure is Measure.TOKENS:
                tokens = (
                    table.c.input_tokens
                    + table.c.output_tokens
                    + table.c.cache_read_tokens
                    + table.c.cache_write_tokens
                )
                value = conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(tokens), 0)).where(where)
                ).scalar_one()
                out.append(int(value))
            else:
                # SQLite keeps money as decimal text (exact per row); its SUM needs numbers, and a double's
                # rounding of the total is far below a nano-dollar at any realistic spend.
                column = sa.cast(table.c.cost_total, sa.Float) if sqlite else table.c.cost_total
                total = conn.execute(
                    sa.select(sa.func.sum(column)).where(where, table.c.cost_total.is_not(None))
                ).scalar_one()
                out.append(0 if total is None else usd_to_nano(Decimal(str(total))))
    return out
