"""Spend so far from the ``requests`` table, on SQLite and PostgreSQL: what limits restart from."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from tests.unit.test_limits_local import gateway_key, provider_key
from trioproxy.crypto import SecretBox
from trioproxy.limits import (
    AdmissionRequest,
    Admitted,
    LimitsSettings,
    Refused,
    Scope,
    SpendQuery,
    open_admission,
)
from trioproxy.limits.model import DAY, Measure, current_period, parse_period
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.settings import UpstreamSettings
from trioproxy.snapshot import UserLimitsView
from trioproxy.store import provisioning as prov
from trioproxy.store.db import config_session, create_engine_for, run_migrations
from trioproxy.store.models import GatewayKey, ProviderKey, User
from trioproxy.store.request_log import insert_request_records
from trioproxy.store.snapshot_loader import load_snapshot
from trioproxy.store.spend import database_spend

NOW = 20_028 * DAY + 7200.0  # 2024-11-01 02:00 UTC: the first day of a month


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    run_migrations(db_url)
    engine = create_engine_for(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def row(rid: str, started_at: float, cost: str | None, **fields: Any) -> RequestRecord:
    fields.setdefault("gateway_key_id", 1)
    return RequestRecord(
        request_id=rid,
        started_at=started_at,
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip=None,
        status=200,
        usage=Usage(input_tokens=100, output_tokens=20, cache_read_tokens=3, cache_write_tokens=1),
        cost=None if cost is None else CostBreakdown(Decimal(cost), Decimal(0), Decimal(0), Decimal(0)),
        **fields,
    )


@pytest.fixture
def history(engine: sa.Engine) -> sa.Engine:
    insert_request_records(
        engine,
        [
            row("a", NOW - 60, "0.1234567891", user_id=5, provider_key_id=9),
            row("b", NOW - 3600, "0.0000000004", user_id=5, provider_key_id=9),
            row("c", NOW - 7200, "1.5", user_id=5),  # exactly midnight: today
            row("d", NOW - 7201, "2", user_id=5, provider_key_id=9),  # yesterday, last month
            row("e", NOW - 30, None, user_id=5, provider_key_id=9, price_missing=True),  # no price: no cost
            row("f", NOW - 10, "7", outcome=Outcome.REJECTED, user_id=5),  # refused by the gateway
            row("g", NOW - 10, "0.25", gateway_key_id=2, user_id=5, outcome=Outcome.UPSTREAM_ERROR),
            row("h", NOW - 40 * DAY, "100", user_id=5),  # long ago
        ],
    )
    return engine


def test_spend_sums_per_subject_measure_and_period(history: sa.Engine) -> None:
    today = NOW - 7200
    queries = [
        SpendQuery(Scope.GATEWAY_KEY, 1, Measure.REQUESTS, today),
        SpendQuery(Scope.GATEWAY_KEY, 1, Measure.TOKENS, today),
        SpendQuery(Scope.GATEWAY_KEY, 1, Measure.COST, today),
        SpendQuery(Scope.GATEWAY_KEY, 1, Measure.COST, 0.0),
        SpendQuery(Scope.USER, 5, Measure.COST, today),
        SpendQuery(Scope.PROVIDER_KEY, 9, Measure.REQUESTS, today),
        SpendQuery(Scope.GATEWAY_KEY, 3, Measure.COST, 0.0),
    ]
    assert database_spend(history, queries) == [
        4,  # a, b, c, e (not d: yesterday; not f: rejected)
        4 * 124,
        1_623_456_790,  # 0.1234567891 + 0.0000000004 + 1.5, rounded up to a nano-dollar
        103_623_456_790,
        1_873_456_790,  # the user's keys: g too (an upstream error still reached the provider)
        3,
        0,
    ]


async def test_budgets_and_quotas_resume_after_a_restart(history: sa.Engine) -> None:
    """A fresh process (a new in-process limiter) starts from what the database says was spent."""
    spend = functools.partial(database_spend, history)
    key = gateway_key(rpd_limit=7, daily_cost_limit=Decimal("1.70"), budget=Decimal("104"))
    user = UserLimitsView(5, Decimal("1.95"), "daily")
    pk = provider_key(9, rpd_limit=5)
    async with open_admission(LimitsSettings(), spend) as admission:

        async def ask(rid: str, cost: str) -> Admitted | Refused:
            request = AdmissionRequest(
                rid, key, NOW, estimated_cost=Decimal(cost), user=user, provider_key=pk
            )
            return await admission.admit(request)

        assert isinstance(await ask("x", "0.05"), Admitted)  # today: $1.6235 of 1.70, user $1.8735 of 1.95
        refused = await ask("y", "0.05")
        assert isinstance(refused, Refused)
        assert refused.limit_name == "daily_cost"
        assert isinstance(await ask("z", "0.01"), Admitted)
        refused = await ask("w", "0.001")
        assert isinstance(refused, Refused)
        assert (refused.scope, refused.limit_name) == (Scope.PROVIDER_KEY, "rpd")  # 3 + x + z of 5
        state = await admission.limit_state(key, NOW, user)
    assert state["spend_today_usd"] == "1.68345679"
    assert state["budget_left_usd"] == "0.31654321"
    assert state["user_budget_left_usd"] == "0.01654321"


def test_a_lifetime_budget_counts_everything(history: sa.Engine) -> None:
    period = current_period(parse_period(None), NOW)
    (spent,) = database_spend(history, [SpendQuery(Scope.USER, 5, Measure.COST, period.start)])
    assert spent == 103_873_456_790
    assert dt.datetime.fromtimestamp(period.start, dt.UTC).year == 1970


def test_the_snapshot_carries_the_limits(engine: sa.Engine) -> None:
    box = SecretBox(bytes(range(32)))
    prov.add_provider(
        engine, name="oa", kind="openai", base_url="https://api.openai.com/v1", allow_private=False
    )
    prov.add_provider_key(engine, box, provider="oa", name="a", secret="sk-proj-AAAAAAAAAAAAAAAAAAAAAAAA1111")
    prov.create_gateway_key(engine, name="g", provider="oa", provider_keys=["a"])
    with config_session(engine) as session:
        session.add(User(username="u", budget=Decimal("12.5"), budget_period="weekly"))
        session.add(User(username="nobudget"))
        session.execute(
            sa.update(GatewayKey).values(
                rpm_limit=1,
                tpm_limit=2,
                rpd_limit=3,
                daily_token_limit=4,
                daily_cost_limit=Decimal("5.25"),
                budget=Decimal("6.5"),
                budget_period="monthly",
                max_concurrency=7,
            )
        )
        session.execute(sa.update(ProviderKey).values(rpm_limit=8, tpm_limit=9, rpd_limit=10))
    snapshot = load_snapshot(engine, box, UpstreamSettings())
    (key,) = snapshot.gateway_keys.values()
    assert (key.rpm_limit, key.tpm_limit, key.rpd_limit, key.daily_token_limit, key.max_concurrency) == (
        1,
        2,
        3,
        4,
        7,
    )
    assert (key.daily_cost_limit, key.budget, key.budget_period) == (
        Decimal("5.25"),
        Decimal("6.5"),
        "monthly",
    )
    (pkey,) = snapshot.provider_keys.values()
    assert (pkey.rpm_limit, pkey.tpm_limit, pkey.rpd_limit) == (8, 9, 10)
    (user,) = snapshot.users.values()  # only users with a budget
    assert (user.budget, user.budget_period) == (Decimal("12.5"), "weekly")
