"""Reads of the request log for the admin API: filtered, paginated, scoped to an owner.

Scoping: ``owner_id=None`` means every user's rows (callers with an admin permission); any other value shows only
rows whose ``user_id`` is that owner (the owner of the gateway key that made the request). A row of another
owner is indistinguishable from a missing one, so the API can answer 404 for both.

Rows come back JSON-ready (:func:`~trioproxy.store.request_log.row_to_json`: ISO-8601 timestamps, decimals as
strings), newest first. The list and its total are read in one snapshot, so they agree.

The pagination and time-range checks here are shared by the other admin reads (audit, statistics).
Everything is blocking; async callers use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from trioproxy.errors import ValidationError
from trioproxy.records import Outcome
from trioproxy.store.db import read_transaction
from trioproxy.store.models import RequestRow
from trioproxy.store.request_log import row_to_json

# OFFSET pagination re-reads the skipped rows, so a page is capped; the admin API caps lower still.
MAX_PAGE_SIZE = 1000

_REQUESTS = cast(sa.Table, RequestRow.__table__)


def page_offset(page: int, page_size: int) -> int:
    """The row offset of a 1-based ``page``; raises :class:`ValidationError` for values out of range."""
    if page < 1:
        raise ValidationError("page starts at 1")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValidationError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return (page - 1) * page_size


def check_instant(name: str, value: dt.datetime | None) -> None:
    """Reject naive datetimes: without an offset an instant is ambiguous."""
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValidationError(f"{name} must carry a time zone offset")


def check_range(since: dt.datetime | None, until: dt.datetime | None) -> None:
    """``since`` (inclusive) and ``until`` (exclusive) must be aware, and in order when both are given."""
    check_instant("since", since)
    check_instant("until", until)
    if since is not None and until is not None and since > until:
        raise ValidationError("since must not be after until")


def _conditions(
    *,
    owner_id: int | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    gateway_key_id: int | None,
    provider_key_id: int | None,
    provider_id: int | None,
    model: str | None,
    status: int | None,
    outcome: str | None,
) -> list[sa.ColumnElement[bool]]:
    c = _REQUESTS.c
    conditions: list[sa.ColumnElement[bool]] = []
    if owner_id is not None:
        conditions.append(c.user_id == owner_id)
    if since is not None:
        conditions.append(c.started_at >= since)
    if until is not None:
        conditions.append(c.started_at < until)
    if gateway_key_id is not None:
        conditions.append(c.gateway_key_id == gateway_key_id)
    if provider_key_id is not None:
        conditions.append(c.provider_key_id == provider_key_id)
    if provider_id is not None:
        conditions.append(c.provider_id == provider_id)
    if model is not None:
        conditions.append(c.model == model)
    if status is not None:
        conditions.append(c.status == status)
    if outcome is not None:
        conditions.append(c.outcome == outcome)
    return conditions


def list_requests(
    engine: Engine,
    *,
    owner_id: int | None,
    page: int,
    page_size: int,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    gateway_key_id: int | None = None,
    provider_key_id: int | None = None,
    provider_id: int | None = None,
    model: str | None = None,
    status: int | None = None,
    outcome: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the request log, newest first, and the number of rows matching the filters.

    ``since`` is inclusive and ``until`` exclusive. ``outcome`` must be one of
    :class:`~trioproxy.records.Outcome`'s values. Raises :class:`ValidationError` for bad arguments.
    """
    offset = page_offset(page, page_size)
    check_range(since, until)
    if outcome is not None and outcome not in {o.value for o in Outcome}:
        raise ValidationError(f"unknown outcome {outcome!r}")
    conditions = _conditions(
        owner_id=owner_id,
        since=since,
        until=until,
        gateway_key_id=gateway_key_id,
        provider_key_id=provider_key_id,
        provider_id=provider_id,
        model=model,
        status=status,
        outcome=outcome,
    )
    c = _REQUESTS.c
    rows_stmt = (
        sa.select(_REQUESTS)
        .where(*conditions)
        .order_by(c.started_at.desc(), c.request_id.desc())
        .limit(page_size)
        .offset(offset)
    )
    count_stmt = sa.select(sa.func.count()).select_from(_REQUESTS).where(*conditions)
    with read_transaction(engine) as conn:
        items = [row_to_json(row) for row in conn.execute(rows_stmt).mappings()]
        total = int(conn.execute(count_stmt).scalar_one())
    return items, total


def get_request(engine: Engine, request_id: str, *, owner_id: int | None) -> dict[str, Any] | None:
    """One request by id, JSON-ready; ``None`` when it does not exist or belongs to another owner."""
    conditions = [_REQUESTS.c.request_id == request_id]
    if owner_id is not None:
        conditions.append(_REQUESTS.c.user_id == owner_id)
    with engine.connect() as conn:
        row = conn.execute(sa.select(_REQUESTS).where(*conditions)).mappings().one_or_none()
    return None if row is None else row_to_json(row)
