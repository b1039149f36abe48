"""Which attempts may be retried, full-jitter backoff, and the per-provider retry budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.balancer.health import AttemptResult
from trioproxy.balancer.retry import RetryBudget, RetryPolicy, backoff_delay, is_retryable


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504, 529])
def test_retryable_statuses(code: int) -> None:
    assert is_retryable(AttemptResult.status(code), committed=False)
    assert not is_retryable(AttemptResult.status(code), committed=True)


@pytest.mark.parametrize("code", [400, 404, 413, 422, 200, 201, 301, 405, 418, 501])
def test_statuses_never_retried(code: int) -> None:
    assert not is_retryable(AttemptResult.status(code), committed=False)


@pytest.mark.parametrize("code", [401, 402, 403])
def test_a_rejected_key_is_retried_on_another_key_unless_configured_off(code: int) -> None:
    assert is_retryable(AttemptResult.status(code), committed=False)
    strict = RetryPolicy(retry_on_key_rejected=False)
    assert not is_retryable(AttemptResult.status(code), committed=False, policy=strict)


def test_transport_failures_before_the_first_byte() -> None:
    for result in (
        AttemptResult.connect_error("refused"),
        AttemptResult.timeout("no first byte"),
        AttemptResult.stream_error_first_event("overloaded_error"),
    ):
        assert is_retryable(result, committed=False)
        assert not is_retryable(result, committed=True)  # never once a byte reached the client
    assert not is_retryable(AttemptResult.ok(0.1), committed=False)
    assert not is_retryable(AttemptResult.client_cancelled(), committed=False)


def test_full_jitter_backoff_bounds() -> None:
    rng = random.Random(1)
    assert backoff_delay(0, rng) == 0.0
    ceilings = {1: 0.5, 2: 1.0, 3: 2.0, 4: 4.0, 5: 8.0, 6: 8.0, 100: 8.0}
    for retry, ceiling in ceilings.items():
        delays = [backoff_delay(retry, rng) for _ in range(2000)]
        assert min(delays) >= 0.0 and max(delays) <= ceiling
        assert max(delays) > 0.9 * ceiling and min(delays) < 0.1 * ceiling  # spread over the whole range


def test_budget_starts_with_its_burst_then_allows_a_fifth_extra() -> None:
    budget = RetryBudget(
        RetryPolicy(budget_ratio=0.2, budget_floor_per_second=0.0, budget_burst=10.0), now=0.0
    )
    assert sum(budget.try_withdraw(0.0) for _ in range(20)) == 10
    allowed = 0
    for _ in range(1000):
        budget.deposit(0.0)
        allowed += budget.try_withdraw(0.0)
    assert allowed == 200


def test_budget_floor_refills_a_quiet_gateway() -> None:
    budget = RetryBudget(RetryPolicy(budget_floor_per_second=3.0, budget_burst=10.0), now=0.0)
    while budget.try_withdraw(0.0):
        pass
    assert not budget.try_withdraw(0.2)
    assert budget.try_withdraw(1.0)  # 3 tokens per second
    assert budget.try_withdraw(1.0)
    assert budget.try_withdraw(1.0)
    assert not budget.try_withdraw(1.0)
    assert budget.balance(1000.0) == 10.0  # never above the burst


@given(
    requests_per_second=st.integers(1, 500),
    seconds=st.integers(1, 60),
    retries_wanted=st.integers(1, 5),
)
def test_an_outage_cannot_multiply_upstream_calls(
    requests_per_second: int, seconds: int, retries_wanted: int
) -> None:
    """Every attempt fails and every request wants ``retries_wanted`` retries: upstream calls stay within
    1.2 x the requests plus the floor and the initial burst (docs/reliability-plan.md F-07)."""
    policy = RetryPolicy()
    budget = RetryBudget(policy, now=0.0)
    calls = 0
    requests = requests_per_second * seconds
    for i in range(requests):
        now = i / requests_per_second
        budget.deposit(now)
        calls += 1
        for _ in range(retries_wanted):
            if not budget.try_withdraw(now):
                break
            calls += 1
    limit = (
        requests * (1 + policy.budget_ratio) + policy.budget_floor_per_second * seconds + policy.budget_burst
    )
    assert calls <= limit
