"""Usage statistics over the ``requests`` table, aggregated by the database (GROUP BY over the indexes on
``started_at``), scoped to an owner, identical on SQLite and PostgreSQL.

Scope: ``owner_id=None`` covers every user; any other value only rows whose ``user_id`` is that owner.

Totals (:class:`Totals`, one per group or bucket): requests, successes (outcome ``ok``) and success rate,
tokens, exact cost, requests without a price, average latency and time to first byte. Ratios and averages are
divided in Python from the sums and counts the database returns, which keeps partial groups mergeable exactly.

Exact money. Costs are stored exactly (``ExactDecimal``: NUMERIC on PostgreSQL, whose SUM is exact; canonical
decimal text on SQLite). SQLite has no decimal arithmetic and its ``SUM`` over text would go through binary
floats, so each cost is split in SQL into its whole dollars (``CAST(text AS INTEGER)`` reads the integer prefix)
and its fraction in units of 1e-10 USD (the digits after the point, padded to the column's scale of 10), and
the two integer SUMs are recombined as a Decimal. Integer SUMs are exact in SQLite, and fail loudly on overflow
instead of rounding; neither part can overflow before about 9e8 rows.

Time zones. Buckets are local wall-clock hours or days in an IANA zone, computed the same way on both
dialects (PostgreSQL's ``AT TIME ZONE`` is not used, so both dialects and the Python side share one zone
database and one algorithm). The range is cut, in Python, into segments over which the zone's UTC offset is
constant (found by probing the offset hourly and bisecting each change to the second). In SQL a CASE over the
segment boundaries gives each row its offset, and integer arithmetic on the UTC epoch gives its local bucket:
``(epoch + offset) / 3600`` or ``/ 86400``. A fixed-offset zone has a single segment, so the CASE is a
constant. A day bucket is a local calendar date (23 or 25 hours long across a DST change); an hour bucket is a
local wall-clock hour at one offset, so the hour repeated when clocks go back gives two buckets (labelled
``02:00+02:00`` and ``02:00+01:00`` in Berlin) and the skipped hour gives none. Buckets without requests are
returned with zero totals, so a chart has no gaps.

Everything is blocking; async callers use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from trioproxy.errors import ValidationError
from trioproxy.records import Outcome
from trioproxy.store.db import read_transaction
from trioproxy.store.models import GatewayKey, Provider, RequestRow
from trioproxy.store.request_query import check_instant, check_range

Bucket = Literal["hour", "day"]
_BUCKET_SECONDS: dict[str, int] = {"hour": 3600, "day": 86400}
# A timeseries answer is bounded: 10,000 hour buckets is 416 days, 10,000 day buckets 27 years.
MAX_BUCKETS = 10_000
# Offsets are probed this often; no zone changes its offset twice within an hour.
_PROBE_SECONDS = 3600
_COST_SCALE = 10  # the scale of the MONEY columns: costs are whole multiples of 1e-10 USD
_UNIX_EPOCH_DAY = dt.date(1970, 1, 1)

_REQUESTS = cast(sa.Table, RequestRow.__table__)
_KEYS = cast(sa.Table, GatewayKey.__table__)
_PROVIDERS = cast(sa.Table, Provider.__table__)


@dataclass(slots=True)
class Totals:
    """Sums and counts of one group of requests; ``+`` merges two disjoint groups exactly."""

    requests: int = 0
    successes: int = 0
    unpriced: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_sum_ms: float = 0.0
    latency_count: int = 0
    ttfb_sum_ms: float = 0.0
    ttfb_count: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Totals)))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the cost as an exact decimal string, rates and averages as floats (None when empty)."""
        return {
            "requests": self.requests,
            "successes": self.successes,
            "errors": self.requests - self.successes,
            "success_rate": self.successes / self.requests if self.requests else None,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            # Reasoning tokens are part of the output tokens, so they are not added again.
            "total_tokens": self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens,
            "cost": money_text(self.cost),
            "unpriced_requests": self.unpriced,
            "avg_latency_ms": self.latency_sum_ms / self.latency_count if self.latency_count else None,
            "avg_ttfb_ms": self.ttfb_sum_ms / self.ttfb_count if self.ttfb_count else None,
        }


def money_text(value: Decimal) -> str:
    """An exact decimal as plain text without trailing zeros or exponent: ``"0.00123"``, ``"10"``."""
    return format(value.normalize(), "f") if value else "0"


# --- SQL building blocks ------------------------------------------------------------------------------------


def _aggregates(dialect: str, src: Any) -> list[sa.ColumnElement[Any]]:
    """The aggregate columns of a Totals over ``src`` (the requests table or a subquery of its columns)."""
    c = src.c

    def count_if(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.sum(sa.case((condition, 1), else_=0))

    columns: list[sa.ColumnElement[Any]] = [
        sa.func.count().label("requests"),
        count_if(c.outcome == Outcome.OK.value).label("successes"),
        count_if(c.price_missing == sa.true()).label("unpriced"),
        sa.func.sum(c.input_tokens).label("input_tokens"),
        sa.func.sum(c.output_tokens).label("output_tokens"),
        sa.func.sum(c.cache_read_tokens).label("cache_read_tokens"),
        sa.func.sum(c.cache_write_tokens).label("cache_write_tokens"),
        sa.func.sum(c.reasoning_tokens).label("reasoning_tokens"),
        sa.func.sum(c.duration_ms).label("latency_sum_ms"),
        sa.func.count(c.duration_ms).label("latency_count"),
        sa.func.sum(c.ttfb_ms).label("ttfb_sum_ms"),
        sa.func.count(c.ttfb_ms).label("ttfb_count"),
    ]
    if dialect == "sqlite":
        text = sa.type_coerce(c.cost_total, sa.String())
        dot = sa.func.instr(text, ".", type_=sa.Integer)
        # CAST reads the longest integer prefix: "12.5" -> 12, "-0.5" -> 0 (the sign then goes on the fraction).
        whole = sa.cast(text, sa.Integer)
        digits = sa.func.substr(sa.func.substr(text, dot + 1).concat("0" * _COST_SCALE), 1, _COST_SCALE)
        fraction = sa.case((dot == 0, 0), else_=sa.cast(digits, sa.Integer))
        signed = sa.case((sa.func.substr(text, 1, 1) == "-", -fraction), else_=fraction)
        columns += [sa.func.sum(whole).label("cost_whole"), sa.func.sum(signed).label("cost_fraction")]
    else:
        columns.append(sa.func.sum(c.cost_total).label("cost"))
    return columns


def _totals(row: Mapping[Any, Any]) -> Totals:
    def integer(name: str) -> int:
        value = row[name]
        return 0 if value is None else int(value)  # PostgreSQL's SUM(bigint) is a numeric

    def real(name: str) -> float:
        value = row[name]
        return 0.0 if value is None else float(value)

    if "cost_whole" in row:
        cost = Decimal(integer("cost_whole")) + Decimal(integer("cost_fraction")).scaleb(-_COST_SCALE)
    else:
        cost = Decimal(0) if row["cost"] is None else Decimal(row["cost"])
    return Totals(
        requests=integer("requests"),
        successes=integer("successes"),
        unpriced=integer("unpriced"),
        input_tokens=integer("input_tokens"),
        output_tokens=integer("output_tokens"),
        cache_read_tokens=integer("cache_read_tokens"),
        cache_write_tokens=integer("cache_write_tokens"),
        reasoning_tokens=integer("reasoning_tokens"),
        cost=cost,
        latency_sum_ms=real("latency_sum_ms"),
        latency_count=integer("latency_count"),
        ttfb_sum_ms=real("ttfb_sum_ms"),
        ttfb_count=integer("ttfb_count"),
    )


_MEASURES = (
    "outcome",
    "price_missing",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_total",
    "duration_ms",
    "ttfb_ms",
)


def _grouped(
    conn: Connection,
    keys: Sequence[sa.ColumnElement[Any]],
    conditions: Sequence[sa.ColumnElement[bool]],
    *,
    limit: int | None = None,
) -> list[tuple[tuple[Any, ...], Totals]]:
    """Totals per distinct value of ``keys`` over the rows matching ``conditions`` (with a ``limit``: only the
    groups with the most requests).

    The keys are computed in a subquery and grouped by name: PostgreSQL would refuse a GROUP BY expression whose
    bound parameters are not the very ones of the SELECT list.
    """
    if conn.dialect.name == "sqlite":
        # Group by an expression, never a bare column: given GROUP BY gateway_key_id, SQLite walks the index led
        # by that column to skip the sort, reading rows out of time order (4x slower than the started_at range).
        keys = [sa.func.coalesce(key, sa.null()) for key in keys]
    labelled = [key.label(f"k{i}") for i, key in enumerate(keys)]
    inner = sa.select(*labelled, *(_REQUESTS.c[name] for name in _MEASURES)).where(*conditions).subquery()
    group = [inner.c[f"k{i}"] for i in range(len(keys))]
    stmt = sa.select(*group, *_aggregates(conn.dialect.name, inner)).group_by(*group)
    if limit is not None:
        stmt = stmt.order_by(sa.func.count().desc(), *(g.asc().nulls_last() for g in group)).limit(limit)
    return [
        (tuple(row[f"k{i}"] for i in range(len(keys))), _totals(row)) for row in conn.execute(stmt).mappings()
    ]


def _scope(owner_id: int | None, gateway_key_id: int | None = None) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if owner_id is not None:
        conditions.append(_REQUESTS.c.user_id == owner_id)
    if gateway_key_id is not None:
        conditions.append(_REQUESTS.c.gateway_key_id == gateway_key_id)
    return conditions


def _interval_totals(
    conn: Connection, scope: Sequence[sa.ColumnElement[bool]], bounds: Sequence[dt.datetime]
) -> list[Totals]:
    """Totals of each interval ``[bounds[i], bounds[i + 1])`` (bounds ascending), in one scan of the range."""
    started = _REQUESTS.c.started_at
    index: sa.ColumnElement[int] = sa.literal(0, sa.Integer)
    if len(bounds) > 2:
        index = sa.case(*((started < b, i) for i, b in enumerate(bounds[1:-1])), else_=len(bounds) - 2)
    rows = _grouped(conn, [index], [*scope, started >= bounds[0], started < bounds[-1]])
    out = [Totals() for _ in bounds[1:]]
    for (i,), totals in rows:
        out[int(i)] = totals
    return out


# --- time zones ---------------------------------------------------------------------------------------------


def zone_for(tz: str) -> ZoneInfo:
    """The IANA zone called ``tz``; raises :class:`ValidationError` for an unknown or malformed name."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a directory of zones ("America")
        raise ValidationError(f"unknown time zone {tz!r}") from exc


def _offset(zone: ZoneInfo, epoch: int) -> int:
    offset = dt.datetime.fromtimestamp(epoch, zone).utcoffset()
    assert offset is not None  # a ZoneInfo always has one
    return int(offset.total_seconds())


def offset_segments(zone: ZoneInfo, start: int, end: int) -> list[tuple[int, int, int]]:
    """``[(from, to, offset_seconds)]`` covering the epoch seconds ``[start, end)``, one per constant offset."""
    segments: list[tuple[int, int, int]] = []
    seg_start, offset = start, _offset(zone, start)
    probe, last = start, end - 1
    while probe < last:
        nxt = min(probe + _PROBE_SECONDS, last)
        if _offset(zone, nxt) == offset:
            probe = nxt
            continue
        lo, hi = probe, nxt  # offset(lo) is the segment's, offset(hi) is not: bisect to the first new second
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _offset(zone, mid) == offset else (lo, mid)
        segments.append((seg_start, hi, offset))
        seg_start, offset, probe = hi, _offset(zone, hi), hi
    segments.append((seg_start, end, offset))
    return segments


def _epoch_seconds(dialect: str) -> sa.ColumnElement[int]:
    started = _REQUESTS.c.started_at
    if dialect == "sqlite":
        # SQLite's date functions round to the millisecond (23:59:59.9996 would become the next day), so the
        # fraction is cut off the stored text ("YYYY-MM-DD HH:MM:SS.ffffff") first: an exact floor.
        whole_seconds = sa.func.substr(sa.type_coerce(started, sa.String()), 1, 19)
        if sqlite3.sqlite_version_info >= (3, 38):
            return sa.func.unixepoch(whole_seconds, type_=sa.Integer)
        return sa.cast(sa.func.strftime("%s", whole_seconds), sa.Integer)
    return sa.cast(sa.func.floor(sa.extract("epoch", started)), sa.BigInteger)


def _segment_offset(segments: Sequence[tuple[int, int, int]]) -> sa.ColumnElement[int]:
    if len(segments) == 1:
        return sa.literal(segments[0][2], sa.Integer)
    started = _REQUESTS.c.started_at
    whens = [(started < dt.datetime.fromtimestamp(end, dt.UTC), off) for _, end, off in segments[:-1]]
    return sa.case(*whens, else_=segments[-1][2])


def _bucket_keys(bucket: str, segments: Iterable[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Every (local bucket index, offset) key of the segments, in time order; days ignore the offset."""
    size = _BUCKET_SECONDS[bucket]
    keys: set[tuple[int, int]] = set()
    for start, end, off in segments:
        for index in range((start + off) // size, (end - 1 + off) // size + 1):
            keys.add((index, off if bucket == "hour" else 0))
    if bucket == "hour":
        return sorted(keys, key=lambda k: k[0] * size - k[1])
    return sorted(keys)


def _bucket_span(bucket: str, key: tuple[int, int], zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    index, off = key
    if bucket == "hour":
        # Labelled with the bucket's own offset: "02:00+02:00" and "02:00+01:00" for an hour repeated in autumn.
        start = dt.datetime.fromtimestamp(index * 3600 - off, dt.timezone(dt.timedelta(seconds=off)))
        return start, (start + dt.timedelta(hours=1)).astimezone(zone)
    day = _UNIX_EPOCH_DAY + dt.timedelta(days=index)
    return local_midnight(day, zone), local_midnight(day + dt.timedelta(days=1), zone)


def local_midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    """The first instant of ``day`` in ``zone`` (01:00 where a DST change skips midnight), in that zone."""
    return dt.datetime.combine(day, dt.time(), tzinfo=zone).astimezone(dt.UTC).astimezone(zone)


# --- public queries -----------------------------------------------------------------------------------------


def _period(start: dt.datetime, end: dt.datetime, totals: Totals) -> dict[str, Any]:
    return {"start": start.isoformat(), "end": end.isoformat(), **totals.to_json()}


def overview(
    engine: Engine, *, owner_id: int | None, now: dt.datetime, tz: str, gateway_key_id: int | None = None
) -> dict[str, Any]:
    """Today versus yesterday (local calendar days in ``tz``, each whole): ``{"tz", "today", "yesterday"}``,
    each period with its ``start``/``end`` and the totals of :meth:`Totals.to_json`."""
    check_instant("now", now)
    zone = zone_for(tz)
    today = now.astimezone(zone).date()
    days = [today - dt.timedelta(days=1), today, today + dt.timedelta(days=1)]
    bounds = [local_midnight(day, zone) for day in days]
    with read_transaction(engine) as conn:
        yesterday_totals, today_totals = _interval_totals(conn, _scope(owner_id, gateway_key_id), bounds)
    return {
        "tz": tz,
        "today": _period(bounds[1], bounds[2], today_totals),
        "yesterday": _period(bounds[0], bounds[1], yesterday_totals),
    }


def timeseries(
    engine: Engine,
    *,
    owner_id: int | None,
    since: dt.datetime,
    until: dt.datetime,
    bucket: Bucket,
    tz: str,
    gateway_key_id: int | None = None,
) -> list[dict[str, Any]]:
    """Totals per local hour or day in ``tz`` over ``[since, until)``, in time order, empty buckets included.

    Each item has ``start`` and ``end`` (ISO-8601 with the local offset) and the totals. The first and last
    buckets cover only the part of them inside the range. Raises :class:`ValidationError` for a bad bucket,
    zone or range, or one of more than :data:`MAX_BUCKETS` buckets.
    """
    if bucket not in _BUCKET_SECONDS:
        raise ValidationError("bucket must be 'hour' or 'day'")
    check_instant("since", since)
    check_instant("until", until)
    check_range(since, until)
    zone = zone_for(tz)
    size = _BUCKET_SECONDS[bucket]
    start, end = math.floor(since.timestamp()), math.ceil(until.timestamp())
    if end <= start:
        return []
    if (end - start) // size + 2 > MAX_BUCKETS:
        raise ValidationError(f"more than {MAX_BUCKETS} {bucket} buckets; shorten the range")
    segments = offset_segments(zone, start, end)
    with read_transaction(engine) as conn:
        offset = _segment_offset(segments)
        index = (_epoch_seconds(conn.dialect.name) + offset) // size
        keys = [index, offset] if bucket == "hour" else [index]
        started = _REQUESTS.c.started_at
        conditions = [*_scope(owner_id, gateway_key_id), started >= since, started < until]
        found = {
            (int(key[0]), int(key[1]) if bucket == "hour" else 0): totals
            for key, totals in _grouped(conn, keys, conditions)
        }
    out = []
    for key in _bucket_keys(bucket, segments):
        begin, finish = _bucket_span(bucket, key, zone)
        out.append(_period(begin, finish, found.get(key, Totals())))
    return out


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and limit < 1:
        raise ValidationError("limit must be at least 1")
    return limit


def _range_conditions(
    owner_id: int | None, since: dt.datetime, until: dt.datetime, gateway_key_id: int | None
) -> list[sa.ColumnElement[bool]]:
    check_instant("since", since)
    check_instant("until", until)
    check_range(since, until)
    started = _REQUESTS.c.started_at
    return [*_scope(owner_id, gateway_key_id), started >= since, started < until]


def by_model(
    engine: Engine,
    *,
    owner_id: int | None,
    since: dt.datetime,
    until: dt.datetime,
    gateway_key_id: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Totals per requested model over ``[since, until)``, most requests first (``model`` None: not known,
    e.g. a request refused before its body was read)."""
    conditions = _range_conditions(owner_id, since, until, gateway_key_id)
    with read_transaction(engine) as conn:
        rows = _grouped(conn, [_REQUESTS.c.model], conditions, limit=_check_limit(limit))
    rows.sort(key=lambda r: (-r[1].requests, r[0][0] is None, r[0][0] or ""))
    return [{"model": key[0], **totals.to_json()} for key, totals in rows]


def by_key(
    engine: Engine,
    *,
    owner_id: int | None,
    since: dt.datetime,
    until: dt.datetime,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Totals per gateway key over ``[since, until)``, most requests first, with the key's name and display
    prefix (None for requests without a key, or whose key was deleted)."""
    conditions = _range_conditions(owner_id, since, until, None)
    with read_transaction(engine) as conn:
        rows = _grouped(conn, [_REQUESTS.c.gateway_key_id], conditions, limit=_check_limit(limit))
        ids = [key[0] for key, _ in rows if key[0] is not None]
        names = {
            row.id: row
            for row in conn.execute(
                sa.select(_KEYS.c.id, _KEYS.c.name, _KEYS.c.key_prefix, _KEYS.c.owner_id).where(
                    _KEYS.c.id.in_(ids)
                )
            )
        }
    rows.sort(key=lambda r: (-r[1].requests, r[0][0] is None, r[0][0] or 0))
    out = []
    for (key_id,), totals in rows:
        meta = names.get(key_id)
        out.append(
            {
                "gateway_key_id": key_id,
                "name": None if meta is None else meta.name,
                "prefix": None if meta is None else meta.key_prefix,
                "owner_id": None if meta is None else meta.owner_id,
                **totals.to_json(),
            }
        )
    return out


def by_provider(
    engine: Engine,
    *,
    owner_id: int | None,
    since: dt.datetime,
    until: dt.datetime,
    gateway_key_id: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Totals per provider over ``[since, until)``, most requests first, with its name and kind (the kind
    recorded on the rows when the provider was deleted since)."""
    conditions = _range_conditions(owner_id, since, until, gateway_key_id)
    c = _REQUESTS.c
    with read_transaction(engine) as conn:
        rows = _grouped(conn, [c.provider_id, c.provider_kind], conditions, limit=_check_limit(limit))
        ids = [key[0] for key, _ in rows if key[0] is not None]
        names = {
            row.id: row
            for row in conn.execute(
                sa.select(_PROVIDERS.c.id, _PROVIDERS.c.name, _PROVIDERS.c.kind).where(
                    _PROVIDERS.c.id.in_(ids)
                )
            )
        }
    rows.sort(key=lambda r: (-r[1].requests, r[0][0] is None, r[0][0] or 0, r[0][1] or ""))
    out = []
    for (provider_id, kind), totals in rows:
        meta = names.get(provider_id)
        out.append(
            {
                "provider_id": provider_id,
                "name": None if meta is None else meta.name,
                "kind": kind if meta is None else meta.kind,
                **totals.to_json(),
            }
        )
    return out


def key_self_usage(
    engine: Engine, gateway_key_id: int, *, now: dt.datetime, tz: str
) -> dict[str, Any] | None:
    """What a key holder may see of their own key: its name, prefix and limits, and its usage today, yesterday
    and this calendar month (local to ``tz``). ``None`` when the key does not exist."""
    check_instant("now", now)
    zone = zone_for(tz)
    today = now.astimezone(zone).date()
    month_start = local_midnight(today.replace(day=1), zone)
    yesterday = local_midnight(today - dt.timedelta(days=1), zone)
    tomorrow = local_midnight(today + dt.timedelta(days=1), zone)
    bounds = [*sorted({month_start, yesterday, local_midnight(today, zone)}), tomorrow]
    k = _KEYS.c
    with read_transaction(engine) as conn:
        key = conn.execute(sa.select(_KEYS).where(k.id == gateway_key_id)).mappings().one_or_none()
        if key is None:
            return None
        parts = dict(
            zip(bounds[:-1], _interval_totals(conn, _scope(None, gateway_key_id), bounds), strict=True)
        )
    month = sum((t for start, t in parts.items() if start >= month_start), Totals())
    limits = {
        name: key[name]
        for name in ("rpm_limit", "tpm_limit", "rpd_limit", "daily_token_limit", "max_concurrency")
    }
    for name in ("daily_cost_limit", "budget"):
        limits[name] = None if key[name] is None else money_text(key[name])
    limits["budget_period"] = key["budget_period"]
    return {
        "gateway_key_id": gateway_key_id,
        "name": key["name"],
        "prefix": key["key_prefix"],
        "enabled": key["enabled"],
        "expires_at": None if key["expires_at"] is None else key["expires_at"].isoformat(),
        "limits": limits,
        "tz": tz,
        "today": _period(bounds[-2], bounds[-1], parts[bounds[-2]]),
        "yesterday": _period(yesterday, bounds[-2], parts[yesterday]),
        "month": _period(month_start, bounds[-1], month),
    }
