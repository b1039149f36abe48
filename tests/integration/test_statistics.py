"""Statistics on real databases (SQLite and PostgreSQL): hand-computed cases, exact money, time zones across DST
changes, and hypothesis-generated request sets compared with a pure-Python reference."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.errors import ValidationError
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.store import statistics as stats
from trioproxy.store.db import create_engine_for, run_migrations, write_transaction
from trioproxy.store.request_log import insert_request_records

UTC = dt.UTC
BERLIN = "Europe/Berlin"
_ids = itertools.count()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    run_migrations(db_url)
    engine = create_engine_for(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def record(
    when: dt.datetime | float,
    *,
    cost: Decimal | None = Decimal("0.001"),
    user_id: int | None = 1,
    gateway_key_id: int | None = 1,
    provider_id: int | None = 1,
    provider_kind: str | None = "openai",
    model: str | None = "gpt-4o",
    outcome: Outcome = Outcome.OK,
    input_tokens: int = 10,
    output_tokens: int = 5,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    duration_ms: float | None = 100.0,
    ttfb_ms: float | None = None,
) -> RequestRecord:
    started = when.timestamp() if isinstance(when, dt.datetime) else when
    return RequestRecord(
        request_id=f"req-{next(_ids):012d}",
        started_at=started,
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="127.0.0.1",
        gateway_key_id=gateway_key_id,
        provider_key_id=1,
        user_id=user_id,
        provider_id=provider_id,
        provider_kind=provider_kind,
        model=model,
        status=200 if outcome is Outcome.OK else 502,
        outcome=outcome,
        usage=Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read_tokens,
            cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens,
            reported=True,
            complete=True,
        ),
        cost=None if cost is None else CostBreakdown(cost, Decimal(0), Decimal(0), Decimal(0)),
        price_missing=cost is None,
        duration_ms=duration_ms,
        ttfb_ms=ttfb_ms,
        attempts=1,
    )


def counts(series: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(b["start"], b["requests"]) for b in series if b["requests"]]


# --- hand-computed cases ------------------------------------------------------------------------------------


def test_autumn_dst_hour_repeats_as_two_buckets_and_the_day_has_25_hours(engine: sa.Engine) -> None:
    # Berlin, 2026-10-25: at 01:00 UTC clocks go from 03:00 CEST back to 02:00 CET.
    insert_request_records(
        engine,
        [
            record(at(2026, 10, 24, 21, 59, 59)),  # 23:59:59 CEST, Saturday
            record(at(2026, 10, 24, 22, 0)),  # 00:00 CEST, Sunday
            record(at(2026, 10, 25, 0, 30)),  # 02:30 CEST
            record(at(2026, 10, 25, 0, 59, 59)),  # 02:59:59 CEST
            record(at(2026, 10, 25, 1, 0)),  # 02:00 CET, the second time
            record(at(2026, 10, 25, 1, 30)),  # 02:30 CET
            record(at(2026, 10, 25, 22, 59, 59)),  # 23:59:59 CET, still Sunday
            record(at(2026, 10, 25, 23, 0)),  # 00:00 CET, Monday
        ],
    )
    hours = stats.timeseries(
        engine,
        owner_id=None,
        since=at(2026, 10, 24, 23),
        until=at(2026, 10, 25, 3),
        bucket="hour",
        tz=BERLIN,
    )
    assert [b["start"] for b in hours] == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert [b["requests"] for b in hours] == [0, 2, 2, 0]
    assert hours[1]["end"] == "2026-10-25T02:00:00+01:00"  # one real hour later

    # From local midnight on the 24th to local midnight on the 27th.
    days = stats.timeseries(
        engine, owner_id=None, since=at(2026, 10, 23, 22), until=at(2026, 10, 26, 23), bucket="day", tz=BERLIN
    )
    assert [(b["start"], b["end"], b["requests"]) for b in days] == [
        ("2026-10-24T00:00:00+02:00", "2026-10-25T00:00:00+02:00", 1),
        ("2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", 6),  # 25 hours
        ("2026-10-26T00:00:00+01:00", "2026-10-27T00:00:00+01:00", 1),
    ]
    # Bucketed in UTC instead, the same rows fall on other days.
    assert counts(
        stats.timeseries(
            engine, owner_id=None, since=at(2026, 10, 24), until=at(2026, 10, 27), bucket="day", tz="UTC"
        )
    ) == [("2026-10-24T00:00:00+00:00", 2), ("2026-10-25T00:00:00+00:00", 6)]


def test_spring_dst_hour_is_skipped_and_the_day_has_23_hours(engine: sa.Engine) -> None:
    # Berlin, 2026-03-29: at 01:00 UTC clocks jump from 02:00 CET to 03:00 CEST.
    insert_request_records(
        engine,
        [
            record(at(2026, 3, 29, 0, 30)),  # 01:30 CET
            record(at(2026, 3, 29, 0, 59, 59, 999999)),  # 01:59:59.999999 CET
            record(at(2026, 3, 29, 1, 0)),  # 03:00 CEST
            record(at(2026, 3, 29, 21, 59)),  # 23:59 CEST
        ],
    )
    hours = stats.timeseries(
        engine, owner_id=None, since=at(2026, 3, 29, 0), until=at(2026, 3, 29, 2), bucket="hour", tz=BERLIN
    )
    assert [(b["start"], b["requests"]) for b in hours] == [
        ("2026-03-29T01:00:00+01:00", 2),
        ("2026-03-29T03:00:00+02:00", 1),
    ]
    days = stats.timeseries(
        engine, owner_id=None, since=at(2026, 3, 28, 23), until=at(2026, 3, 29, 22), bucket="day", tz=BERLIN
    )
    assert [(b["start"], b["end"], b["requests"]) for b in days] == [
        ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 4)
    ]


def test_half_hour_zone_and_sub_second_boundaries(engine: sa.Engine) -> None:
    # Asia/Kolkata is UTC+05:30 all year: local hours start at half past UTC hours.
    insert_request_records(
        engine,
        [
            record(at(2026, 1, 1, 0, 29, 59, 999999)),  # 05:59:59.999999 local
            record(at(2026, 1, 1, 0, 30)),  # 06:00 local
            record(at(2026, 1, 1, 18, 29, 59)),  # 23:59:59 local
            record(at(2026, 1, 1, 18, 30)),  # 00:00 local, next day
        ],
    )
    hours = stats.timeseries(
        engine,
        owner_id=None,
        since=at(2026, 1, 1, 0, 0),
        until=at(2026, 1, 1, 1, 0),
        bucket="hour",
        tz="Asia/Kolkata",
    )
    assert counts(hours) == [("2026-01-01T05:00:00+05:30", 1), ("2026-01-01T06:00:00+05:30", 1)]
    assert [b["start"] for b in hours] == ["2026-01-01T05:00:00+05:30", "2026-01-01T06:00:00+05:30"]
    days = stats.timeseries(
        engine, owner_id=None, since=at(2025, 12, 31), until=at(2026, 1, 3), bucket="day", tz="Asia/Kolkata"
    )
    assert counts(days) == [("2026-01-01T00:00:00+05:30", 3), ("2026-01-02T00:00:00+05:30", 1)]


def test_cost_sums_are_exact_where_floats_are_not(engine: sa.Engine) -> None:
    big = Decimal("9999999999.9999999999")  # the largest value of NUMERIC(20, 10)
    costs = [Decimal("0.1")] * 10 + [Decimal("0.0000000001")] * 3 + [big, big]
    insert_request_records(engine, [record(at(2026, 5, 1, 12), cost=c) for c in costs])
    expected = Decimal("20000000001.0000000001")
    assert sum(costs) == expected
    assert Decimal(sum(float(c) for c in costs)) != expected  # what a float SUM would have answered
    overview = stats.overview(engine, owner_id=None, now=at(2026, 5, 1, 18), tz="UTC")
    assert overview["today"]["cost"] == "20000000001.0000000001"
    [model] = stats.by_model(engine, owner_id=None, since=at(2026, 5, 1), until=at(2026, 5, 2))
    assert model["cost"] == "20000000001.0000000001"


def test_negative_and_whole_costs_keep_their_sign(engine: sa.Engine) -> None:
    costs = [Decimal("-0.5"), Decimal("1.25"), Decimal("-3"), Decimal("7"), Decimal("-0.0000000001")]
    insert_request_records(engine, [record(at(2026, 5, 1, 12), cost=c) for c in costs])
    [day] = stats.timeseries(
        engine, owner_id=None, since=at(2026, 5, 1), until=at(2026, 5, 2), bucket="day", tz="UTC"
    )
    assert day["cost"] == "4.7499999999"


def test_overview_today_versus_yesterday(engine: sa.Engine) -> None:
    now = at(2026, 7, 2, 21, 30)  # 23:30 in Berlin on 2 July
    insert_request_records(
        engine,
        [
            # today in Berlin (2 July, from 22:00 UTC on 1 July)
            record(at(2026, 7, 1, 22, 0), input_tokens=100, output_tokens=20, duration_ms=200.0),
            record(
                at(2026, 7, 2, 21, 0),
                outcome=Outcome.UPSTREAM_ERROR,
                cost=None,
                input_tokens=7,
                output_tokens=0,
                cache_read_tokens=3,
                cache_write_tokens=4,
                duration_ms=50.0,
                ttfb_ms=40.0,
            ),
            record(at(2026, 7, 2, 21, 45), duration_ms=None),  # later today, after "now": still today
            # yesterday in Berlin
            record(at(2026, 6, 30, 22, 0), cost=Decimal("0.25")),
            record(at(2026, 7, 1, 21, 59, 59), cost=Decimal("0.5"), reasoning_tokens=3),
            # neither: the day before, the day after, and another owner
            record(at(2026, 6, 30, 21, 59, 59)),
            record(at(2026, 7, 2, 22, 0)),
            record(at(2026, 7, 2, 12, 0), user_id=2),
        ],
    )
    result = stats.overview(engine, owner_id=1, now=now, tz=BERLIN)
    json.dumps(result)
    assert result["tz"] == BERLIN
    today, yesterday = result["today"], result["yesterday"]
    assert (today["start"], today["end"]) == ("2026-07-02T00:00:00+02:00", "2026-07-03T00:00:00+02:00")
    assert (yesterday["start"], yesterday["end"]) == (
        "2026-07-01T00:00:00+02:00",
        "2026-07-02T00:00:00+02:00",
    )
    assert today == {
        "start": today["start"],
        "end": today["end"],
        "requests": 3,
        "successes": 2,
        "errors": 1,
        "success_rate": 2 / 3,
        "input_tokens": 117,
        "output_tokens": 25,
        "cache_read_tokens": 3,
        "cache_write_tokens": 4,
        "reasoning_tokens": 0,
        "total_tokens": 149,
        "cost": "0.002",
        "unpriced_requests": 1,
        "avg_latency_ms": 125.0,
        "avg_ttfb_ms": 40.0,
    }
    assert (yesterday["requests"], yesterday["cost"], yesterday["reasoning_tokens"]) == (2, "0.75", 3)
    everyone = stats.overview(engine, owner_id=None, now=now, tz=BERLIN)
    assert everyone["today"]["requests"] == 4
    assert stats.overview(engine, owner_id=99, now=now, tz=BERLIN)["today"]["success_rate"] is None


def test_groupings_by_model_key_and_provider(engine: sa.Engine) -> None:
    with write_transaction(engine) as conn:
        conn.execute(
            sa.text(
                "INSERT INTO providers (id, name, kind, base_url, headers, enabled, created_at, updated_at) "
                "VALUES (1, 'oa', 'openai', 'https://api.openai.com', '{}', true, :t, :t)"
            ),
            {"t": at(2026, 1, 1)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO gateway_keys (id, owner_id, name, provider_id, key_hash, key_prefix, strategy, "
                "retry_count, enabled, created_at, updated_at) "
                "VALUES (7, NULL, 'app', 1, 'h', 'tpk_abcdefgh', 'round_robin', 0, true, :t, :t)"
            ),
            {"t": at(2026, 1, 1)},
        )
    when = at(2026, 2, 1, 12)
    insert_request_records(
        engine,
        [
            record(when, model="a", gateway_key_id=7, provider_id=1),
            record(when, model="a", gateway_key_id=7, provider_id=1),
            record(when, model="b", gateway_key_id=8, provider_id=5, provider_kind="gemini"),
            record(when, model=None, gateway_key_id=None, provider_id=None, provider_kind=None, cost=None),
            record(at(2026, 2, 3), model="c"),  # outside the range
        ],
    )
    since, until = at(2026, 2, 1), at(2026, 2, 2)
    models = stats.by_model(engine, owner_id=None, since=since, until=until)
    assert [(m["model"], m["requests"], m["cost"]) for m in models] == [
        ("a", 2, "0.002"),
        ("b", 1, "0.001"),
        (None, 1, "0"),
    ]
    assert [m["model"] for m in stats.by_model(engine, owner_id=None, since=since, until=until, limit=1)] == [
        "a"
    ]
    keys = stats.by_key(engine, owner_id=None, since=since, until=until)
    assert [(k["gateway_key_id"], k["name"], k["prefix"], k["requests"]) for k in keys] == [
        (7, "app", "tpk_abcdefgh", 2),
        (8, None, None, 1),  # a deleted key still counts
        (None, None, None, 1),
    ]
    providers = stats.by_provider(engine, owner_id=None, since=since, until=until)
    assert [(p["provider_id"], p["name"], p["kind"], p["requests"]) for p in providers] == [
        (1, "oa", "openai", 2),
        (5, None, "gemini", 1),
        (None, None, None, 1),
    ]
    assert stats.by_provider(engine, owner_id=2, since=since, until=until) == []
    json.dumps([models, keys, providers])


def test_key_self_usage(engine: sa.Engine) -> None:
    with write_transaction(engine) as conn:
        conn.execute(
            sa.text(
                "INSERT INTO providers (id, name, kind, base_url, headers, enabled, created_at, updated_at) "
                "VALUES (1, 'oa', 'openai', 'https://api.openai.com', '{}', true, :t, :t)"
            ),
            {"t": at(2026, 1, 1)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO gateway_keys (id, owner_id, name, provider_id, key_hash, key_prefix, strategy, "
                "retry_count, enabled, daily_cost_limit, daily_token_limit, created_at, updated_at) "
                "VALUES (3, NULL, 'mine', 1, 'h', 'tpk_12345678', 'round_robin', 0, true, :limit, 5000, :t, :t)"
            ),
            {"t": at(2026, 1, 1), "limit": "2.5"},
        )
    insert_request_records(
        engine,
        [
            record(at(2026, 2, 28, 12), gateway_key_id=3),  # last month
            record(at(2026, 3, 1, 12), gateway_key_id=3, cost=Decimal("0.5")),  # yesterday
            record(at(2026, 3, 2, 8), gateway_key_id=3, cost=Decimal("0.25")),  # today
            record(at(2026, 3, 2, 9), gateway_key_id=3, cost=Decimal("0.25")),  # today
            record(at(2026, 3, 2, 9), gateway_key_id=4),  # another key
        ],
    )
    usage = stats.key_self_usage(engine, 3, now=at(2026, 3, 2, 10), tz="UTC")
    assert usage is not None
    json.dumps(usage)
    assert (usage["name"], usage["prefix"], usage["enabled"]) == ("mine", "tpk_12345678", True)
    assert usage["limits"]["daily_cost_limit"] == "2.5"
    assert usage["limits"]["daily_token_limit"] == 5000
    assert (usage["today"]["requests"], usage["today"]["cost"]) == (2, "0.5")
    assert (usage["yesterday"]["requests"], usage["yesterday"]["cost"]) == (1, "0.5")
    assert (usage["month"]["requests"], usage["month"]["cost"], usage["month"]["start"]) == (
        3,
        "1",
        "2026-03-01T00:00:00+00:00",
    )
    # On the first of the month, yesterday belongs to the previous month.
    first = stats.key_self_usage(engine, 3, now=at(2026, 3, 1, 23), tz="UTC")
    assert first is not None
    assert (first["today"]["requests"], first["yesterday"]["requests"], first["month"]["requests"]) == (
        1,
        1,
        1,
    )
    assert stats.key_self_usage(engine, 404, now=at(2026, 3, 2), tz="UTC") is None


def test_owner_scope(engine: sa.Engine) -> None:
    when = at(2026, 4, 1, 12)
    insert_request_records(
        engine, [record(when, user_id=1), record(when, user_id=2), record(when, user_id=None)]
    )
    since, until = at(2026, 4, 1), at(2026, 4, 2)
    for owner, expected in ((None, 3), (1, 1), (2, 1), (3, 0)):
        [day] = stats.timeseries(engine, owner_id=owner, since=since, until=until, bucket="day", tz="UTC")
        assert day["requests"] == expected
        assert (
            sum(m["requests"] for m in stats.by_model(engine, owner_id=owner, since=since, until=until))
            == expected
        )
    [only_key] = stats.timeseries(
        engine, owner_id=None, since=since, until=until, bucket="day", tz="UTC", gateway_key_id=1
    )
    assert only_key["requests"] == 3


def test_requests_are_aggregated_by_the_database(engine: sa.Engine) -> None:
    # 300 rows in one hour: every statement that reads `requests` groups them, and at most a handful of rows
    # cross into Python (one per bucket or group).
    insert_request_records(engine, [record(at(2026, 4, 1, 12, 0, n % 60)) for n in range(300)])
    seen: list[str] = []

    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "FROM requests" in statement:
            seen.append(statement)

    sa.event.listen(engine, "after_cursor_execute", after)
    try:
        since, until = at(2026, 4, 1), at(2026, 4, 2)
        series = stats.timeseries(engine, owner_id=None, since=since, until=until, bucket="hour", tz=BERLIN)
        stats.overview(engine, owner_id=None, now=at(2026, 4, 1, 13), tz=BERLIN)
        stats.by_model(engine, owner_id=None, since=since, until=until)
    finally:
        sa.event.remove(engine, "after_cursor_execute", after)
    assert sum(b["requests"] for b in series) == 300
    assert len(seen) == 3
    assert all("GROUP BY" in statement and "count(*)" in statement for statement in seen)


def test_validation_errors(engine: sa.Engine) -> None:
    since, until = at(2026, 1, 1), at(2026, 1, 2)
    with pytest.raises(ValidationError, match="time zone"):
        stats.overview(engine, owner_id=None, now=since, tz="Mars/Olympus_Mons")
    with pytest.raises(ValidationError, match="time zone"):
        stats.timeseries(engine, owner_id=None, since=since, until=until, bucket="day", tz="../../etc/passwd")
    with pytest.raises(ValidationError, match="bucket"):
        stats.timeseries(engine, owner_id=None, since=since, until=until, bucket="week", tz="UTC")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="buckets"):
        stats.timeseries(
            engine, owner_id=None, since=at(2020, 1, 1), until=at(2026, 1, 1), bucket="hour", tz="UTC"
        )
    with pytest.raises(ValidationError, match="offset"):
        stats.by_model(engine, owner_id=None, since=dt.datetime(2026, 1, 1), until=until)
    with pytest.raises(ValidationError, match="after"):
        stats.by_key(engine, owner_id=None, since=until, until=since)
    with pytest.raises(ValidationError, match="limit"):
        stats.by_provider(engine, owner_id=None, since=since, until=until, limit=0)
    assert stats.timeseries(engine, owner_id=None, since=since, until=since, bucket="day", tz="UTC") == []


# --- offset segments (pure) ---------------------------------------------------------------------------------


def test_offset_segments_find_each_change_to_the_second() -> None:
    zone = ZoneInfo(BERLIN)
    start, end = int(at(2026, 1, 1).timestamp()), int(at(2027, 1, 1).timestamp())
    spring, autumn = int(at(2026, 3, 29, 1).timestamp()), int(at(2026, 10, 25, 1).timestamp())
    assert stats.offset_segments(zone, start, end) == [
        (start, spring, 3600),
        (spring, autumn, 7200),
        (autumn, end, 3600),
    ]
    assert stats.offset_segments(ZoneInfo("Asia/Kolkata"), start, end) == [(start, end, 19800)]
    # A range ending exactly at a change does not include the new offset.
    assert stats.offset_segments(zone, start, spring) == [(start, spring, 3600)]
    assert stats.offset_segments(zone, spring - 1, spring + 1) == [
        (spring - 1, spring, 3600),
        (spring, spring + 1, 7200),
    ]


# --- property: the database agrees with a pure-Python reference ---------------------------------------------

ZONES = ["UTC", BERLIN, "America/New_York", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"]


def _changes(zone: ZoneInfo) -> list[int]:
    """Epoch seconds (to the hour) around which the zone's offset changes in 2026, found by plain scanning."""
    start = int(at(2026, 1, 1).timestamp())
    out, prev = [], zone.utcoffset(dt.datetime.fromtimestamp(start, UTC).replace(tzinfo=None))
    for hour in range(1, 366 * 24):
        t = start + hour * 3600
        off = dt.datetime.fromtimestamp(t, zone).utcoffset()
        if off != prev:
            out.append(t)
            prev = off
    return out or [int(at(2026, 6, 15, 12).timestamp())]


CENTERS = {name: _changes(ZoneInfo(name)) for name in ZONES}
SPAN_US = 2 * 86400 * 1_000_000
MONEY = st.decimals(min_value=0, max_value=Decimal("4999999999.9999999999"), places=10)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[str, int, list[RequestRecord], float, float, float]:
    tz = draw(st.sampled_from(ZONES))
    center = draw(st.sampled_from(CENTERS[tz]))
    near_hours = st.builds(lambda h, j: h * 3_600_000_000 + j, st.integers(-48, 48), st.integers(-2, 2))
    offsets = st.one_of(st.integers(-SPAN_US, SPAN_US), near_hours)
    rows = []
    for us in draw(st.lists(offsets, max_size=30)):
        cost = draw(st.one_of(st.none(), MONEY))
        rows.append(
            record(
                center + us / 1e6,
                cost=cost,
                user_id=draw(st.sampled_from([1, 2, None])),
                gateway_key_id=draw(st.sampled_from([1, 2, None])),
                provider_id=draw(st.sampled_from([1, 2, None])),
                provider_kind=draw(st.sampled_from(["openai", "gemini", None])),
                model=draw(st.sampled_from(["a", "b", None])),
                outcome=draw(st.sampled_from(list(Outcome))),
                input_tokens=draw(st.integers(0, 10**7)),
                output_tokens=draw(st.integers(0, 10**6)),
                cache_read_tokens=draw(st.integers(0, 10**6)),
                cache_write_tokens=draw(st.integers(0, 1000)),
                reasoning_tokens=draw(st.integers(0, 1000)),
                duration_ms=draw(st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False))),
                ttfb_ms=draw(st.one_of(st.none(), st.floats(0, 1e5, allow_nan=False))),
            )
        )
    # Half the time the whole window (every row counts), else a random part of it.
    whole = SPAN_US + 3_600_000_000
    since = center + draw(st.one_of(st.just(-whole), st.integers(-SPAN_US, 0))) / 1e6
    until = center + draw(st.one_of(st.just(whole), st.integers(0, SPAN_US))) / 1e6
    now = center + draw(st.integers(-SPAN_US, SPAN_US)) / 1e6
    owner = draw(st.sampled_from([None, 1, 2]))
    return tz, owner, rows, since, until, now  # type: ignore[return-value]


def stored(r: RequestRecord) -> dt.datetime:
    return dt.datetime.fromtimestamp(r.started_at, UTC)  # exactly what the request log stores


def reference(rows: Iterable[RequestRecord]) -> dict[str, Any]:
    rows = list(rows)
    n = len(rows)
    ok = sum(r.outcome is Outcome.OK for r in rows)
    durations = [r.duration_ms for r in rows if r.duration_ms is not None]
    ttfbs = [r.ttfb_ms for r in rows if r.ttfb_ms is not None]
    tokens = {
        name: sum(getattr(r.usage, name) for r in rows)
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
        )
    }
    cost = sum((r.cost.total for r in rows if r.cost is not None), Decimal(0))
    return {
        "requests": n,
        "successes": ok,
        "errors": n - ok,
        "success_rate": ok / n if n else None,
        **tokens,
        "total_tokens": sum(tokens.values()) - tokens["reasoning_tokens"],
        "cost": cost,
        "unpriced_requests": sum(r.price_missing for r in rows),
        "avg_latency_ms": sum(durations) / len(durations) if durations else None,
        "avg_ttfb_ms": sum(ttfbs) / len(ttfbs) if ttfbs else None,
    }


def assert_totals(got: dict[str, Any], expected: dict[str, Any]) -> None:
    got = dict(got)
    for name in ("avg_latency_ms", "avg_ttfb_ms"):
        value, want = got.pop(name), expected[name]
        assert (value is None) == (want is None), name
        if want is not None:
            assert value == pytest.approx(want, rel=1e-9, abs=1e-9), name
    assert Decimal(got.pop("cost")) == expected["cost"]  # exact
    got.pop("start", None)
    got.pop("end", None)
    assert got == {k: v for k, v in expected.items() if k not in ("avg_latency_ms", "avg_ttfb_ms", "cost")}


def hour_key(t: dt.datetime, zone: ZoneInfo) -> str:
    """The local wall-clock hour of ``t`` at ``t``'s own offset, written like the API writes it."""
    local = t.astimezone(zone)
    offset = local.utcoffset()
    assert offset is not None
    return local.replace(minute=0, second=0, microsecond=0, tzinfo=dt.timezone(offset)).isoformat()


def day_key(t: dt.datetime, zone: ZoneInfo) -> dt.date:
    return t.astimezone(zone).date()


@settings(
    max_examples=examples(60),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_statistics_agree_with_a_python_reference(engine: sa.Engine, scenario: Any) -> None:
    tz, owner, rows, since_ts, until_ts, now_ts = scenario
    zone = ZoneInfo(tz)
    with write_transaction(engine) as conn:
        conn.execute(sa.text("DELETE FROM requests"))
    insert_request_records(engine, rows)
    since, until, now = (dt.datetime.fromtimestamp(x, UTC) for x in (since_ts, until_ts, now_ts))
    mine = [r for r in rows if owner is None or r.user_id == owner]
    in_range = [r for r in mine if since <= stored(r) < until]

    for bucket, key in (("hour", hour_key), ("day", day_key)):
        series = stats.timeseries(engine, owner_id=owner, since=since, until=until, bucket=bucket, tz=tz)  # type: ignore[arg-type]
        groups: dict[Any, list[RequestRecord]] = {}
        for r in in_range:
            groups.setdefault(key(stored(r), zone), []).append(r)
        by_label = {
            b["start"] if bucket == "hour" else dt.date.fromisoformat(b["start"][:10]): b for b in series
        }
        assert len(by_label) == len(series)  # labels are unique
        assert set(groups) <= set(by_label)
        for label, bucket_item in by_label.items():
            assert_totals(bucket_item, reference(groups.get(label, [])))
        starts = [dt.datetime.fromisoformat(b["start"]) for b in series]
        assert starts == sorted(starts)
        if series and tz != "Australia/Lord_Howe":  # its half-hour DST shift makes nominal hours overlap
            assert starts[0] <= since < dt.datetime.fromisoformat(series[0]["end"])
            assert all(
                dt.datetime.fromisoformat(a["end"]) == dt.datetime.fromisoformat(b["start"])
                for a, b in itertools.pairwise(series)
            )

    overview = stats.overview(engine, owner_id=owner, now=now, tz=tz)
    today = now.astimezone(zone).date()
    assert_totals(overview["today"], reference(r for r in mine if day_key(stored(r), zone) == today))
    yesterday = today - dt.timedelta(days=1)
    assert_totals(overview["yesterday"], reference(r for r in mine if day_key(stored(r), zone) == yesterday))

    for fn, attr in ((stats.by_model, "model"), (stats.by_key, "gateway_key_id")):
        got = {item[attr]: item for item in fn(engine, owner_id=owner, since=since, until=until)}
        expected_keys = {getattr(r, attr) for r in in_range}
        assert set(got) == expected_keys
        for value in expected_keys:
            assert_totals(
                {k: v for k, v in got[value].items() if k not in (attr, "name", "prefix", "owner_id")},
                reference(r for r in in_range if getattr(r, attr) == value),
            )
    providers = stats.by_provider(engine, owner_id=owner, since=since, until=until)
    got_p = {(p["provider_id"], p["kind"]): p for p in providers}
    expected_p = {(r.provider_id, r.provider_kind) for r in in_range}
    assert set(got_p) == expected_p
    for provider_id, kind in expected_p:
        item = {
            k: v for k, v in got_p[(provider_id, kind)].items() if k not in ("provider_id", "name", "kind")
        }
        assert_totals(
            item, reference(r for r in in_range if (r.provider_id, r.provider_kind) == (provider_id, kind))
        )
    requests = [p["requests"] for p in providers]
    assert requests == sorted(requests, reverse=True)


def test_a_directory_of_zones_is_not_a_zone() -> None:
    with pytest.raises(ValidationError):
        stats.zone_for("America")
