"""The request log as the admin API reads it, on SQLite and PostgreSQL: filters, owner scope, pagination."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.errors import ValidationError
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.store.db import create_engine_for, run_migrations, write_transaction
from trioproxy.store.request_log import insert_request_records
from trioproxy.store.request_query import MAX_PAGE_SIZE, get_request, list_requests

T0 = 1_780_000_000.0


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    run_migrations(db_url)
    engine = create_engine_for(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def make(n: int, **fields: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "request_id": f"req-{n:04d}",
        "started_at": T0 + n,
        "route": "openai.chat_completions",
        "method": "POST",
        "path": "/v1/chat/completions",
        "client_ip": "127.0.0.1",
        "gateway_key_id": 1,
        "provider_key_id": 10,
        "user_id": 1,
        "provider_id": 100,
        "provider_kind": "openai",
        "model": "gpt-4o",
        "status": 200,
        "outcome": Outcome.OK,
        "usage": Usage(input_tokens=5, output_tokens=7, reported=True, complete=True),
        "cost": CostBreakdown(Decimal("0.0001"), Decimal("0.0002"), Decimal(0), Decimal(0)),
        "duration_ms": 12.5,
        "attempts": 1,
    }
    values.update(fields)
    return RequestRecord(**values)


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["request_id"] for item in items]


def test_newest_first_pages_and_total(engine: sa.Engine) -> None:
    # Two rows share a timestamp: the request id breaks the tie, so pages never overlap or skip.
    insert_request_records(engine, [make(n) for n in range(7)] + [make(7, started_at=T0 + 6)])
    page1, total = list_requests(engine, owner_id=None, page=1, page_size=3)
    page2, _ = list_requests(engine, owner_id=None, page=2, page_size=3)
    page3, _ = list_requests(engine, owner_id=None, page=3, page_size=3)
    assert total == 8
    assert ids(page1) == ["req-0007", "req-0006", "req-0005"]
    assert ids(page2) == ["req-0004", "req-0003", "req-0002"]
    assert ids(page3) == ["req-0001", "req-0000"]
    assert list_requests(engine, owner_id=None, page=4, page_size=3) == ([], 8)


def test_rows_are_json_ready_with_exact_decimal_strings(engine: sa.Engine) -> None:
    insert_request_records(engine, [make(1), make(2, cost=None, price_missing=True)])
    [unpriced, priced], total = list_requests(engine, owner_id=None, page=1, page_size=10, model="gpt-4o")
    assert total == 2
    json.dumps([priced, unpriced])
    assert priced["cost_total"] == "0.0003"
    assert priced["cost_cache_read"] == "0"  # not "0E-10" on PostgreSQL
    assert priced["started_at"] == dt.datetime.fromtimestamp(T0 + 1, dt.UTC).isoformat()
    assert unpriced["cost_total"] is None and unpriced["price_missing"] is True
    assert priced["usage_complete"] is True and priced["outcome"] == "ok"


def test_each_filter(engine: sa.Engine) -> None:
    insert_request_records(
        engine,
        [
            make(0),
            make(1, gateway_key_id=2),
            make(2, provider_key_id=11),
            make(3, provider_id=101, provider_kind="anthropic"),
            make(4, model="claude-haiku-4-5"),
            make(5, status=429, outcome=Outcome.UPSTREAM_ERROR),
            make(6, status=401, outcome=Outcome.REJECTED, user_id=None, gateway_key_id=None),
            make(7, user_id=2),
        ],
    )

    def only(**filters: Any) -> list[str]:
        items, total = list_requests(engine, owner_id=None, page=1, page_size=100, **filters)
        assert total == len(items)
        return sorted(ids(items))

    assert only(gateway_key_id=2) == ["req-0001"]
    assert only(provider_key_id=11) == ["req-0002"]
    assert only(provider_id=101) == ["req-0003"]
    assert only(model="claude-haiku-4-5") == ["req-0004"]
    assert only(status=429) == ["req-0005"]
    assert only(outcome="rejected") == ["req-0006"]
    assert only(outcome="upstream_error", status=429) == ["req-0005"]
    assert only(outcome="upstream_error", status=200) == []
    since = dt.datetime.fromtimestamp(T0 + 2, dt.UTC)
    until = dt.datetime.fromtimestamp(T0 + 4, dt.UTC)
    assert only(since=since, until=until) == ["req-0002", "req-0003"]  # since inclusive, until exclusive
    # The same instant in another zone is the same filter.
    assert only(since=since.astimezone(dt.timezone(dt.timedelta(hours=-7))), until=until) == [
        "req-0002",
        "req-0003",
    ]
    assert len(only()) == 8


def test_owner_scope_hides_other_users_rows(engine: sa.Engine) -> None:
    insert_request_records(engine, [make(0, user_id=1), make(1, user_id=2), make(2, user_id=None)])
    mine, total = list_requests(engine, owner_id=1, page=1, page_size=10)
    assert (ids(mine), total) == (["req-0000"], 1)
    assert list_requests(engine, owner_id=2, page=1, page_size=10, gateway_key_id=1)[1] == 1
    assert list_requests(engine, owner_id=3, page=1, page_size=10) == ([], 0)
    assert list_requests(engine, owner_id=None, page=1, page_size=10)[1] == 3

    assert get_request(engine, "req-0001", owner_id=2) is not None
    assert get_request(engine, "req-0001", owner_id=None) is not None
    assert get_request(engine, "req-0001", owner_id=1) is None  # another owner's row looks missing
    assert get_request(engine, "req-0002", owner_id=1) is None
    assert get_request(engine, "no-such-id", owner_id=None) is None
    row = get_request(engine, "req-0000", owner_id=1)
    assert row is not None
    assert row["request_id"] == "req-0000" and row["input_tokens"] == 5
    json.dumps(row)


def test_bad_arguments_are_validation_errors(engine: sa.Engine) -> None:
    with pytest.raises(ValidationError):
        list_requests(engine, owner_id=None, page=0, page_size=10)
    with pytest.raises(ValidationError):
        list_requests(engine, owner_id=None, page=1, page_size=0)
    with pytest.raises(ValidationError):
        list_requests(engine, owner_id=None, page=1, page_size=MAX_PAGE_SIZE + 1)
    with pytest.raises(ValidationError, match="outcome"):
        list_requests(engine, owner_id=None, page=1, page_size=10, outcome="great")
    with pytest.raises(ValidationError, match="offset"):
        list_requests(engine, owner_id=None, page=1, page_size=10, since=dt.datetime(2026, 1, 1))
    later = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    with pytest.raises(ValidationError, match="after"):
        list_requests(engine, owner_id=None, page=1, page_size=10, since=later, until=later - dt.timedelta(1))
    assert list_requests(engine, owner_id=None, page=1, page_size=MAX_PAGE_SIZE) == ([], 0)


@st.composite
def row_sets(draw: st.DrawFn) -> list[RequestRecord]:
    count = draw(st.integers(0, 25))
    return [
        make(
            n,
            started_at=T0 + draw(st.integers(0, 20)),  # many ties
            user_id=draw(st.sampled_from([1, 2, None])),
            gateway_key_id=draw(st.sampled_from([1, 2, None])),
            model=draw(st.sampled_from(["a", "b", None])),
            outcome=draw(st.sampled_from(list(Outcome))),
        )
        for n in range(count)
    ]


@settings(
    max_examples=examples(40),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=row_sets(),
    owner=st.sampled_from([None, 1, 2]),
    key=st.sampled_from([None, 1, 2]),
    model=st.sampled_from([None, "a", "b"]),
    since=st.one_of(st.none(), st.integers(0, 21)),
    page_size=st.integers(1, 6),
)
def test_pages_agree_with_a_python_reference(
    engine: sa.Engine,
    rows: list[RequestRecord],
    owner: int | None,
    key: int | None,
    model: str | None,
    since: int | None,
    page_size: int,
) -> None:
    with write_transaction(engine) as conn:
        conn.execute(sa.text("DELETE FROM requests"))
    insert_request_records(engine, rows)
    expected = sorted(
        (
            r
            for r in rows
            if (owner is None or r.user_id == owner)
            and (key is None or r.gateway_key_id == key)
            and (model is None or r.model == model)
            and (since is None or r.started_at >= T0 + since)
        ),
        key=lambda r: (r.started_at, r.request_id),
        reverse=True,
    )
    since_at = None if since is None else dt.datetime.fromtimestamp(T0 + since, dt.UTC)
    seen: list[str] = []
    page = 1
    while True:
        items, total = list_requests(
            engine,
            owner_id=owner,
            page=page,
            page_size=page_size,
            gateway_key_id=key,
            model=model,
            since=since_at,
        )
        assert total == len(expected)
        if not items:
            break
        assert len(items) <= page_size
        seen += ids(items)
        page += 1
    assert seen == [r.request_id for r in expected]
