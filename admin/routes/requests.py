"""``/api/requests``: the request log, filtered and paginated, scoped to the caller's own requests.

A caller without ``view_all_tenants`` sees only the requests made with its own gateway keys; another user's
request answers 404, exactly like one that does not exist. Rows are newest first; costs are exact decimal
strings in USD; ``attempts_log`` lists every upstream attempt (provider key id, status or error, milliseconds).

:func:`instant` is the time-parameter check the other read routes (statistics, audit) share.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field
from quart import Blueprint
from quart_schema import tag, validate_querystring, validate_response

from admin import pagination
from admin.errors import ApiError
from admin.rbac import current_actor, requires
from admin.schemas import Output, Page, PageQuery, QueryId
from admin.state import get_state
from trioproxy.errors import NotFoundError
from trioproxy.roles import Permission
from trioproxy.store import request_query

bp = Blueprint("requests", __name__, url_prefix="/api/requests")

# Instants the API takes: from the epoch to well before anything overflows (datetime's year 9999 + an offset).
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)
_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")

OutcomeName = Literal["ok", "upstream_error", "client_cancelled", "upstream_died", "rejected"]


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def instant(name: str, value: dt.datetime | None, zone: dt.tzinfo | None = None) -> dt.datetime | None:
    """``value`` as an aware UTC instant: a naive value is read in ``zone`` (400 without one); 400 when it is
    outside 1970 .. 9000 (so no offset arithmetic can overflow)."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        if zone is None:
            raise bad_request(f"{name} must carry a time zone offset, e.g. 2025-01-31T00:00:00Z")
        value = value.replace(tzinfo=zone)
    try:
        utc = value.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise bad_request(f"{name} is out of range") from None
    if not EARLIEST <= utc < LATEST:
        raise bad_request(f"{name} must be between {EARLIEST.date()} and {LATEST.date()}")
    return utc


class RequestQuery(PageQuery):
    since: dt.datetime | None = Field(default=None, description="inclusive, ISO-8601 with an offset")
    until: dt.datetime | None = Field(default=None, description="exclusive, ISO-8601 with an offset")
    gateway_key_id: QueryId | None = None
    provider_key_id: QueryId | None = None
    provider_id: QueryId | None = None
    model: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    status: Annotated[int, Field(ge=0, le=999)] | None = None
    outcome: OutcomeName | None = None


class AttemptOut(Output):
    key: int | None = Field(description="the provider key tried (null: no key, e.g. the deadline ran out)")
    status: int | None = Field(description="the provider's HTTP status, null when none came")
    error: str | None
    ms: float | None = None


class RequestOut(Output):
    request_id: str
    started_at: dt.datetime
    gateway_key_id: int | None
    provider_key_id: int | None
    user_id: int | None
    provider_id: int | None
    provider_kind: str | None
    route: str
    method: str
    path: str
    model: str | None
    stream: bool
    status: int
    outcome: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    usage_reported: bool
    usage_complete: bool
    usage_partial: bool
    usage_estimated: bool
    cost_input: str | None
    cost_output: str | None
    cost_cache_read: str | None
    cost_cache_write: str | None
    cost_total: str | None
    price_missing: bool
    ttfb_ms: float | None
    duration_ms: float | None
    attempts: int
    attempts_log: list[AttemptOut]
    panic: bool
    client_ip: str | None
    error: str | None


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the API shows it: the attempt log parsed (the column is JSON text)."""
    out = dict(row)
    raw = out.pop("attempt_log", None)
    attempts: Any = []
    if raw:
        try:
            attempts = json.loads(raw)
        except ValueError:
            attempts = []
    out["attempts_log"] = [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []
    return out


@bp.get("")
@requires(Permission.VIEW_LOGS)
@tag(["requests"])
@validate_querystring(RequestQuery)
@validate_response(Page[RequestOut])
async def list_requests(query_args: RequestQuery) -> dict[str, Any]:
    """The request log, newest first, with filters (``since`` inclusive, ``until`` exclusive)."""
    state = get_state()
    page, size = pagination.bounds(query_args)
    q = query_args
    items, total = await state.db(
        request_query.list_requests,
        state.engine,
        owner_id=current_actor().owner_filter(),
        page=page,
        page_size=size,
        since=instant("since", q.since),
        until=instant("until", q.until),
        gateway_key_id=q.gateway_key_id,
        provider_key_id=q.provider_key_id,
        provider_id=q.provider_id,
        model=q.model,
        status=q.status,
        outcome=q.outcome,
    )
    return pagination.page([_shape(item) for item in items], total, page, size)


@bp.get("/<request_id>")
@requires(Permission.VIEW_LOGS)
@tag(["requests"])
@validate_response(RequestOut)
async def get_request(request_id: str) -> dict[str, Any]:
    """One request by its id (the ``x-request-id`` the proxy answered with)."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise NotFoundError(f"request {request_id[:64]!r} not found")
    state = get_state()
    row = await state.db(
        request_query.get_request, state.engine, request_id, owner_id=current_actor().owner_filter()
    )
    if row is None:
        raise NotFoundError(f"request {request_id!r} not found")
    return _shape(row)
