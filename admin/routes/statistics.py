"""Usage statistics: ``/api/statistics/*`` for logged-in users, ``/api/stats/self`` for a gateway key's holder.

Every figure is aggregated by the database (:mod:`trioproxy.store.statistics`) and scoped: a caller without
``view_all_tenants`` only ever counts the requests of its own gateway keys.

Time zones: every route takes ``tz``, an IANA zone name (default ``UTC``); an unknown name answers 400. It
decides what "today" and "yesterday" are, where hour and day buckets start, and how a ``since``/``until``
without an offset is read (``2025-03-01T00:00`` is midnight in ``tz``). Default ranges: the last 24 hours for
hour buckets, the last 30 local days for day buckets, the last 7 local days (today included) for the
breakdowns by model, key and provider.

``/api/stats/self`` needs no login: the gateway key itself, in ``Authorization: Bearer``, opens its own usage
(today, yesterday and this month) and limits. The key is never accepted in the URL, where it would end up in
access logs and browser histories. It answers for keys the proxy currently accepts (enabled, not expired, owner
active), read from the live snapshot, so it is 401 exactly when the proxy would say 401.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field
from quart import Blueprint, request
from quart_schema import document_headers, tag, validate_querystring, validate_response

from admin.errors import ApiError, unauthorized
from admin.rbac import Access, current_actor, requires
from admin.routes.requests import bad_request, instant
from admin.schemas import Output, Query, QueryId
from admin.state import get_state
from trioproxy.errors import TrioProxyError
from trioproxy.gateway_keys import has_valid_checksum, hash_gateway_key
from trioproxy.roles import Permission
from trioproxy.store import statistics

bp = Blueprint("statistics", __name__)

TimeZone = Annotated[
    str, Field(min_length=1, max_length=64, description="IANA time zone, e.g. Europe/Berlin")
]
Limit = Annotated[int, Field(ge=1, le=1000)]
HOUR_DEFAULT = dt.timedelta(hours=24)
DAY_DEFAULT_DAYS = 30
BREAKDOWN_DEFAULT_DAYS = 7
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9][A-Za-z0-9_+-]*){0,2}")


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or 400."""
    # A name is a relative path into the zone database: refuse anything else before touching the disk (a
    # directory such as "America" makes ZoneInfo raise IsADirectoryError, not "not found").
    if _ZONE_NAME.fullmatch(name):
        try:
            return statistics.zone_for(name)
        except (TrioProxyError, OSError, ValueError):
            pass
    raise bad_request(f"unknown time zone {name[:64]!r}; use an IANA name such as Europe/Berlin")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _days_ago(tz: ZoneInfo, days: int) -> dt.datetime:
    today = _now().astimezone(tz).date()
    return statistics.local_midnight(today - dt.timedelta(days=days - 1), tz)


def _range(
    since: dt.datetime | None, until: dt.datetime | None, tz: ZoneInfo, default_since: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    end = instant("until", until, tz) or _now()
    start = instant("since", since, tz) or min(default_since, end)
    if start > end:
        raise bad_request("since must not be after until")
    return start, end


# --- schemas ------------------------------------------------------------------------------------------------


class StatsQuery(Query):
    tz: TimeZone = "UTC"
    gateway_key_id: QueryId | None = None


class RangeQuery(StatsQuery):
    since: dt.datetime | None = Field(default=None, description="inclusive; without an offset: local to tz")
    until: dt.datetime | None = Field(default=None, description="exclusive; default now")
    limit: Limit | None = Field(default=None, description="at most this many groups, largest first")


class TimeseriesQuery(StatsQuery):
    since: dt.datetime | None = Field(default=None, description="inclusive; without an offset: local to tz")
    until: dt.datetime | None = Field(default=None, description="exclusive; default now")
    bucket: Literal["hour", "day"] = "hour"


class SelfQuery(Query):
    tz: TimeZone = "UTC"


class BearerHeader(BaseModel):
    authorization: str = Field(description="Bearer <gateway key>")


class Totals(Output):
    requests: int
    successes: int
    errors: int
    success_rate: float | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost: str = Field(description="USD, exact decimal")
    unpriced_requests: int
    avg_latency_ms: float | None
    avg_ttfb_ms: float | None


class PeriodOut(Totals):
    start: dt.datetime
    end: dt.datetime


class OverviewOut(Output):
    tz: str
    today: PeriodOut
    yesterday: PeriodOut


class TimeseriesOut(Output):
    tz: str
    bucket: str
    since: dt.datetime
    until: dt.datetime
    items: list[PeriodOut]


class ModelRow(Totals):
    model: str | None


class KeyRow(Totals):
    gateway_key_id: int | None
    name: str | None
    prefix: str | None
    owner_id: int | None


class ProviderRow(Totals):
    provider_id: int | None
    name: str | None
    kind: str | None


class _Breakdown(Output):
    tz: str
    since: dt.datetime
    until: dt.datetime


class ModelsOut(_Breakdown):
    items: list[ModelRow]


class KeysOut(_Breakdown):
    items: list[KeyRow]


class ProvidersOut(_Breakdown):
    items: list[ProviderRow]


class SelfLimits(Output):
    rpm_limit: int | None
    tpm_limit: int | None
    rpd_limit: int | None
    daily_token_limit: int | None
    max_concurrency: int | None
    daily_cost_limit: str | None
    budget: str | None
    budget_period: str | None


class SelfUsageOut(Output):
    gateway_key_id: int
    name: str
    prefix: str
    enabled: bool
    expires_at: dt.datetime | None
    limits: SelfLimits
    tz: str
    today: PeriodOut
    yesterday: PeriodOut
    month: PeriodOut


# --- routes -------------------------------------------------------------------------------------------------


@bp.get("/api/statistics/overview")
@requires(Permission.VIEW_STATISTICS)
@tag(["statistics"])
@validate_querystring(StatsQuery)
@validate_response(OverviewOut)
async def overview(query_args: StatsQuery) -> dict[str, Any]:
    """Today versus yesterday (local days in ``tz``): requests, success rate, tokens, cost, average latency."""
    zone(query_args.tz)
    state = get_state()
    return await state.db(
        statistics.overview,
        state.engine,
        owner_id=current_actor().owner_filter(),
        now=_now(),
        tz=query_args.tz,
        gateway_key_id=query_args.gateway_key_id,
    )


@bp.get("/api/statistics/timeseries")
@requires(Permission.VIEW_STATISTICS)
@tag(["statistics"])
@validate_querystring(TimeseriesQuery)
@validate_response(TimeseriesOut)
async def timeseries(query_args: TimeseriesQuery) -> dict[str, Any]:
    """Totals per local hour or day of ``tz``, in time order, empty buckets included (at most 10,000)."""
    tz = zone(query_args.tz)
    hourly = query_args.bucket == "hour"
    default = _now() - HOUR_DEFAULT if hourly else _days_ago(tz, DAY_DEFAULT_DAYS)
    since, until = _range(query_args.since, query_args.until, tz, default)
    state = get_state()
    items = await state.db(
        statistics.timeseries,
        state.engine,
        owner_id=current_actor().owner_filter(),
        since=since,
        until=until,
        bucket=query_args.bucket,
        tz=query_args.tz,
        gateway_key_id=query_args.gateway_key_id,
    )
    return {"tz": query_args.tz, "bucket": query_args.bucket, "since": since, "until": until, "items": items}


async def _breakdown(query_args: RangeQuery, fn: Any, *, by_key: bool = False) -> dict[str, Any]:
    tz = zone(query_args.tz)
    since, until = _range(query_args.since, query_args.until, tz, _days_ago(tz, BREAKDOWN_DEFAULT_DAYS))
    state = get_state()
    extra = {} if by_key else {"gateway_key_id": query_args.gateway_key_id}
    items = await state.db(
        fn,
        state.engine,
        owner_id=current_actor().owner_filter(),
        since=since,
        until=until,
        limit=query_args.limit,
        **extra,
    )
    if by_key and query_args.gateway_key_id is not None:
        items = [item for item in items if item["gateway_key_id"] == query_args.gateway_key_id]
    return {"tz": query_args.tz, "since": since, "until": until, "items": items}


@bp.get("/api/statistics/models")
@requires(Permission.VIEW_STATISTICS)
@tag(["statistics"])
@validate_querystring(RangeQuery)
@validate_response(ModelsOut)
async def by_model(query_args: RangeQuery) -> dict[str, Any]:
    """Totals per requested model over ``[since, until)``, most requests first."""
    return await _breakdown(query_args, statistics.by_model)


@bp.get("/api/statistics/keys")
@requires(Permission.VIEW_STATISTICS)
@tag(["statistics"])
@validate_querystring(RangeQuery)
@validate_response(KeysOut)
async def by_key(query_args: RangeQuery) -> dict[str, Any]:
    """Totals per gateway key over ``[since, until)``, most requests first."""
    return await _breakdown(query_args, statistics.by_key, by_key=True)


@bp.get("/api/statistics/providers")
@requires(Permission.VIEW_STATISTICS)
@tag(["statistics"])
@validate_querystring(RangeQuery)
@validate_response(ProvidersOut)
async def by_provider(query_args: RangeQuery) -> dict[str, Any]:
    """Totals per provider over ``[since, until)``, most requests first."""
    return await _breakdown(query_args, statistics.by_provider)


def _gateway_key_from_header() -> str:
    header = request.headers.get("Authorization")
    scheme, _, key = (header or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise unauthorized("send the gateway key as Authorization: Bearer <key>")
    if not has_valid_checksum(key):  # constant cost, no lookup: typos and JWTs stop here
        raise unauthorized("invalid gateway key")
    return key


@bp.get("/api/stats/self")
@requires(Access.PUBLIC)
@tag(["statistics"])
@document_headers(BearerHeader)
@validate_querystring(SelfQuery)
@validate_response(SelfUsageOut)
async def self_usage(query_args: SelfQuery) -> dict[str, Any]:
    """A gateway key's own usage and limits, for its holder (no admin login).

    Send the gateway key as ``Authorization: Bearer <key>``; it is never accepted in the URL. Usage is given
    for today, yesterday and this month, as calendar periods in ``tz``."""
    key = _gateway_key_from_header()
    zone(query_args.tz)
    state = get_state()
    if state.gateway is None:
        raise ApiError(503, "unavailable", "the proxy is not running in this process")
    view = state.gateway.snapshots.current.gateway_keys.get(hash_gateway_key(key))
    if view is None or not view.enabled or (view.expires_at is not None and view.expires_at <= time.time()):
        raise unauthorized("invalid gateway key")
    usage = await state.db(statistics.key_self_usage, state.engine, view.id, now=_now(), tz=query_args.tz)
    if usage is None:  # deleted since the snapshot was taken
        raise unauthorized("invalid gateway key")
    return usage
