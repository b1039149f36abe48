"""The limiter's pure parts: periods, money units, plans, verdicts, statuses per dialect and headers."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_limits_local import gateway_key, provider_key, usd
from trioproxy.limits.model import (
    DAY,
    AdmissionRequest,
    BudgetPeriod,
    CheckKind,
    CheckResult,
    Plan,
    RefusalKind,
    Refused,
    Scope,
    build_plan,
    current_period,
    decide,
    format_reset,
    nano_to_usd,
    parse_period,
    usd_to_nano,
)
from trioproxy.snapshot import ProviderKind, UserLimitsView

times = st.floats(0, 4_000_000_000, allow_nan=False, allow_infinity=False)


@given(now=times, period=st.sampled_from([*BudgetPeriod, None]))
def test_periods_contain_now_and_are_calendar_aligned(now: float, period: BudgetPeriod | None) -> None:
    current = current_period(period, now)
    assert current.start <= now
    if period is None:
        assert current.end is None
        return
    assert current.end is not None
    assert now < current.end
    start = dt.datetime.fromtimestamp(current.start, dt.UTC)
    assert (start.hour, start.minute, start.second) == (0, 0, 0)
    if period is BudgetPeriod.WEEKLY:
        assert start.weekday() == 0
        assert current.end - current.start == 7 * DAY
    if period is BudgetPeriod.MONTHLY:
        assert start.day == 1
        end = dt.datetime.fromtimestamp(current.end, dt.UTC)
        assert (end.day, (end.month - start.month) % 12) == (1, 1)
    # The id names the period: the next period has another one.
    assert current_period(period, current.end).id != current.id


def test_parse_period() -> None:
    assert parse_period("Monthly") is BudgetPeriod.MONTHLY
    assert parse_period(None) is None
    assert parse_period("fortnightly") is None  # unknown: strictest, never resets


@given(st.decimals(min_value=0, max_value=10**6, places=12))
def test_money_rounds_up_to_nano_dollars(value: Decimal) -> None:
    nano = usd_to_nano(value)
    assert nano_to_usd(nano) >= value
    assert nano_to_usd(nano) - value < Decimal("1e-9")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (0.0001, "1ms"), (1, "1s"), (1.2, "2s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_durations_look_like_openai(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def request(**kwargs: object) -> AdmissionRequest:
    fields: dict[str, object] = {"request_id": "r1", "gateway_key": gateway_key(), "now": 1000.0}
    fields.update(kwargs)
    return AdmissionRequest(**fields)  # type: ignore[arg-type]


def test_a_key_without_limits_has_an_empty_plan() -> None:
    plan = build_plan(request())
    assert isinstance(plan, Plan)
    assert plan.checks == ()


def test_plan_has_one_check_per_limit_in_order() -> None:
    key = gateway_key(
        rpm_limit=1,
        tpm_limit=2,
        rpd_limit=3,
        daily_token_limit=4,
        daily_cost_limit=Decimal("5"),
        budget=Decimal("6"),
        budget_period="weekly",
        max_concurrency=7,
    )
    plan = build_plan(
        request(
            gateway_key=key,
            estimated_tokens=50,
            estimated_cost=Decimal("0.25"),
            user=UserLimitsView(9, Decimal("10"), "monthly"),
            provider_key=provider_key(4, rpm_limit=11, tpm_limit=12, rpd_limit=13),
        )
    )
    assert isinstance(plan, Plan)
    summary = [(c.scope.value, c.name, c.kind, c.limit, c.amount) for c in plan.checks]
    assert summary == [
        ("gateway_key", "rpm", CheckKind.WINDOW, 1, 1),
        ("gateway_key", "tpm", CheckKind.WINDOW, 2, 50),
        ("gateway_key", "rpd", CheckKind.COUNTER, 3, 1),
        ("gateway_key", "daily_tokens", CheckKind.COUNTER, 4, 50),
        ("gateway_key", "daily_cost", CheckKind.COUNTER, 5 * 10**9, 250_000_000),
        ("gateway_key", "budget", CheckKind.COUNTER, 6 * 10**9, 250_000_000),
        ("gateway_key", "concurrency", CheckKind.GAUGE, 7, 1),
        ("user", "budget", CheckKind.COUNTER, 10 * 10**9, 250_000_000),
        ("provider_key", "rpm", CheckKind.WINDOW, 11, 1),
        ("provider_key", "tpm", CheckKind.WINDOW, 12, 50),
        ("provider_key", "rpd", CheckKind.COUNTER, 13, 1),
    ]
    keys = [c.key for c in plan.checks]
    assert len(set(keys)) == len(keys)
    assert keys[5].startswith("gk:1:budget:w") and keys[7].startswith("u:9:budget:m")
    assert plan.lease_until > plan.now


def test_a_money_limit_refuses_an_unpriced_model() -> None:
    refused = build_plan(
        request(gateway_key=gateway_key(budget=Decimal("1")), model="mystery", estimated_cost=None)
    )
    assert isinstance(refused, Refused)
    assert refused.kind is RefusalKind.UNPRICED
    assert "mystery" in refused.message
    assert refused.status_for(ProviderKind.OPENAI) == 403
    # Without a money limit, an unpriced model is fine.
    assert isinstance(build_plan(request(gateway_key=gateway_key(rpm_limit=5), estimated_cost=None)), Plan)


def _plan(**kwargs: object) -> Plan:
    plan = build_plan(request(**kwargs))
    assert isinstance(plan, Plan)
    return plan


def test_refusal_statuses_per_dialect() -> None:
    plan = _plan(gateway_key=gateway_key(budget=Decimal("1")), estimated_cost=Decimal("0.5"))
    verdict = decide(plan, (CheckResult(False, 900_000_000),), "local")
    assert isinstance(verdict, Refused)
    assert verdict.kind is RefusalKind.BUDGET
    assert verdict.status_for(ProviderKind.ANTHROPIC) == 402
    assert verdict.status_for(ProviderKind.OPENAI) == 429
    assert verdict.status_for(ProviderKind.GEMINI) == 429
    assert verdict.openai_code == "insufficient_quota"
    assert verdict.retry_after is None  # a lifetime budget does not come back by waiting
    assert "budget of 1 USD is used up" in verdict.message

    rate = decide(_plan(gateway_key=gateway_key(rpm_limit=3)), (CheckResult(False, 3, 50.0, 12.2),), "local")
    assert isinstance(rate, Refused)
    assert rate.kind is RefusalKind.RATE
    assert {rate.status_for(k) for k in ProviderKind} == {429}
    assert rate.openai_code == "rate_limit_exceeded"
    assert rate.retry_after == 13
    headers = dict(rate.headers)
    assert headers[b"retry-after"] == b"13"
    assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"50s"


def test_daily_quota_retries_at_midnight() -> None:
    plan = _plan(gateway_key=gateway_key(rpd_limit=10), now=DAY + 3600.0)
    verdict = decide(plan, (CheckResult(False, 10),), "local")
    assert isinstance(verdict, Refused)
    assert verdict.kind is RefusalKind.QUOTA
    assert verdict.retry_after == 23 * 3600
    # Only open reservations in the way: try again soon.
    soon = decide(plan, (CheckResult(False, 10, None, 1.0),), "local")
    assert isinstance(soon, Refused)
    assert soon.retry_after == 1


def test_a_request_larger_than_the_limit_is_too_large_without_retry() -> None:
    plan = _plan(gateway_key=gateway_key(tpm_limit=100), estimated_tokens=500)
    verdict = decide(plan, (CheckResult(False, 0, 0.0, None),), "local")
    assert isinstance(verdict, Refused)
    assert verdict.kind is RefusalKind.TOO_LARGE
    assert verdict.retry_after is None
    assert b"retry-after" not in dict(verdict.headers)
    assert "about 500 tokens" in verdict.message


def test_provider_key_refusal_only_when_the_clients_own_limits_pass() -> None:
    plan = _plan(gateway_key=gateway_key(rpm_limit=5), provider_key=provider_key(rpm_limit=1))
    pk_only = decide(plan, (CheckResult(True, 1), CheckResult(False, 1, 10.0, 10.0)), "local")
    assert isinstance(pk_only, Refused)
    assert pk_only.scope is Scope.PROVIDER_KEY
    both = decide(plan, (CheckResult(False, 5, 10.0, 3.0), CheckResult(False, 1, 10.0, 30.0)), "local")
    assert isinstance(both, Refused)
    assert both.scope is Scope.GATEWAY_KEY


def test_admitted_headers_count_this_request() -> None:
    plan = _plan(gateway_key=gateway_key(rpm_limit=10, daily_token_limit=1000), estimated_tokens=100)
    verdict = decide(plan, (CheckResult(True, 4, 20.0), CheckResult(True, 300)), "local")
    headers = dict(verdict.headers)
    assert headers[b"x-ratelimit-remaining-requests"] == b"5"
    assert headers[b"x-ratelimit-reset-requests"] == b"1m0s"
    assert headers[b"x-ratelimit-limit-tokens"] == b"1000"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"600"


def test_unavailable_and_concurrency_statuses() -> None:
    plan = _plan(gateway_key=gateway_key(max_concurrency=2))
    verdict = decide(plan, (CheckResult(False, 2),), "local")
    assert isinstance(verdict, Refused)
    assert verdict.kind is RefusalKind.CONCURRENCY
    assert verdict.retry_after == 1
    assert verdict.status_for(ProviderKind.ANTHROPIC) == 429


def test_usd_helper_round_trips() -> None:
    assert usd_to_nano(usd(1234)) == 1234
