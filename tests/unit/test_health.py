"""The per-key health state machine, driven by results and explicit times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.balancer.health import (
    AttemptKind,
    AttemptResult,
    HealthPolicy,
    KeyHealth,
    KeyState,
    Verdict,
    classify,
)

POLICY = HealthPolicy()


def state(health: KeyHealth) -> KeyState:
    """Read the state through a call, so the type checker does not pin it after a first assert."""
    return health.state


def attempt(health: KeyHealth, result: AttemptResult, now: float, cooldown: float | None = None) -> None:
    health.refresh(now)
    health.started(now)
    health.finished(result, now, cooldown=cooldown)


def fail(health: KeyHealth, now: float, times: int = 1, code: int = 500) -> None:
    for _ in range(times):
        attempt(health, AttemptResult.status(code), now)


@pytest.mark.parametrize(
    ("result", "verdict"),
    [
        (AttemptResult.ok(0.1), Verdict.SUCCESS),
        (AttemptResult.status(400), Verdict.SUCCESS),  # the client's mistake: the key works
        (AttemptResult.status(404), Verdict.SUCCESS),
        (AttemptResult.status(422), Verdict.SUCCESS),
        (AttemptResult.status(409), Verdict.NEUTRAL),
        (AttemptResult.status(408), Verdict.FAILURE),
        (AttemptResult.status(429), Verdict.RATE_LIMITED),
        (AttemptResult.status(401), Verdict.KEY_REJECTED),
        (AttemptResult.status(402), Verdict.KEY_REJECTED),
        (AttemptResult.status(403), Verdict.KEY_REJECTED),
        (AttemptResult.status(500), Verdict.FAILURE),
        (AttemptResult.status(503), Verdict.FAILURE),
        (AttemptResult.status(529), Verdict.FAILURE),
        (AttemptResult.timeout(), Verdict.FAILURE),
        (AttemptResult.connect_error(), Verdict.FAILURE),
        (AttemptResult.stream_error_first_event("overloaded_error"), Verdict.FAILURE),
        (AttemptResult.client_cancelled(), Verdict.NEUTRAL),
    ],
)
def test_classification(result: AttemptResult, verdict: Verdict) -> None:
    assert classify(result) is verdict


def test_five_failures_in_a_row_eject_for_30_seconds_then_half_open() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    fail(health, 10.0, times=4)
    assert state(health) is KeyState.ACTIVE
    attempt(health, AttemptResult.ok(0.2), 10.0)  # a success breaks the run
    fail(health, 11.0, times=4)
    assert state(health) is KeyState.ACTIVE
    fail(health, 11.0)
    assert state(health) is KeyState.EJECTED
    assert health.deadline == 41.0
    assert health.reason.startswith("5 failures in a row (HTTP 500)")
    assert not health.available()
    assert health.refresh(40.999) is None
    transition = health.refresh(41.0)
    assert transition is not None and transition.new is KeyState.HALF_OPEN
    assert health.available()


def test_half_open_allows_one_trial_and_its_result_decides() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    fail(health, 0.0, times=5)
    health.refresh(30.0)
    health.started(30.0)
    assert health.trial_in_flight and not health.available()
    transition = health.finished(AttemptResult.ok(0.3), 31.0)
    assert transition is not None and transition.new is KeyState.ACTIVE
    assert health.window_counts(31.0) == (1, 0)  # a clean window after recovery


def test_exponential_ejection_backoff_is_capped_and_forgotten_after_healthy_time() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    now = 0.0
    durations = []
    fail(health, now, times=5)
    for _ in range(8):
        assert state(health) is KeyState.EJECTED and health.deadline is not None
        durations.append(health.deadline - now)
        now = health.deadline
        health.refresh(now)
        assert state(health) is KeyState.HALF_OPEN
        fail(health, now)  # the trial fails
    assert durations == [30, 60, 120, 240, 480, 900, 900, 900]
    assert health.deadline is not None
    now = health.deadline
    health.refresh(now)
    attempt(health, AttemptResult.ok(0.1), now)
    assert state(health) is KeyState.ACTIVE and health.ejections == 9
    fail(health, now + 100, times=5)  # soon after: the backoff continues where it was
    assert health.deadline == now + 100 + 900
    now = health.deadline
    health.refresh(now)
    attempt(health, AttemptResult.ok(0.1), now)
    fail(health, now + POLICY.ejection_memory, times=5)  # healthy long enough: a first ejection again
    assert health.deadline == now + POLICY.ejection_memory + 30
    assert health.ejections == 1


def test_error_rate_over_the_window_ejects() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    for i in range(10):
        now = float(i)
        result = AttemptResult.timeout("first byte") if i % 2 else AttemptResult.ok(0.1)
        attempt(health, result, now)
    # 5 of 10 failed, never 5 in a row
    assert state(health) is KeyState.EJECTED
    assert "5 of 10 attempts failed" in health.reason


def test_old_failures_leave_the_window() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    for i in range(4):
        fail(health, float(i))
        attempt(health, AttemptResult.ok(0.1), float(i))
    assert health.window_counts(5.0) == (4, 4)
    assert health.window_counts(200.0) == (0, 0)
    for i in range(9):
        attempt(health, AttemptResult.ok(0.1) if i % 3 else AttemptResult.connect_error(), 200.0 + i)
    assert state(health) is KeyState.ACTIVE  # 3 of 9 in the new window


def test_429_cools_down_for_the_providers_time_or_the_default() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    attempt(health, AttemptResult.status(429), 5.0, cooldown=2.0)
    assert state(health) is KeyState.COOLING_DOWN and health.deadline == 7.0
    assert health.consecutive_failures == 0  # rate limiting is not ill health
    health.refresh(7.0)
    assert state(health) is KeyState.ACTIVE
    attempt(health, AttemptResult.status(429), 10.0)
    assert health.deadline == 10.0 + POLICY.default_cooldown
    attempt(health, AttemptResult.status(429), 10.0, cooldown=10**9)
    assert health.deadline == 10.0 + POLICY.max_cooldown  # capped


def test_a_second_429_never_shortens_a_cooldown() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    health.started(0.0)
    health.started(0.0)
    health.finished(AttemptResult.status(429), 0.0, cooldown=60.0)
    health.finished(AttemptResult.status(429), 1.0, cooldown=5.0)
    assert health.deadline == 60.0
    health.started(2.0)  # a panic pick
    health.finished(AttemptResult.status(429), 2.0, cooldown=100.0)
    assert health.deadline == 102.0


def test_401_makes_the_key_invalid_until_reset_or_mark_valid() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    attempt(health, AttemptResult.status(401), 1.0)
    assert state(health) is KeyState.INVALID and health.deadline is None
    assert health.refresh(10**6) is None and state(health) is KeyState.INVALID
    attempt(health, AttemptResult.ok(0.1), 2.0)  # a straggler's success proves nothing
    assert state(health) is KeyState.INVALID
    assert health.mark_valid(3.0, "key test succeeded") is not None
    assert state(health) is KeyState.ACTIVE
    attempt(health, AttemptResult.status(403), 4.0)
    transition = health.reset(5.0, "reset by an admin")
    assert transition is not None and transition.new is KeyState.ACTIVE
    assert health.last_error is None


def test_results_of_older_attempts_do_not_move_an_ejected_key() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    health.started(0.0)  # a long stream, started while healthy
    fail(health, 1.0, times=5)
    assert state(health) is KeyState.EJECTED
    assert health.finished(AttemptResult.ok(2.0), 2.0) is None
    assert state(health) is KeyState.EJECTED
    assert health.in_flight == 0


def test_a_cancelled_trial_lets_the_next_attempt_try() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    fail(health, 0.0, times=5)
    health.refresh(30.0)
    health.started(30.0)
    assert not health.available()
    assert health.finished(AttemptResult.client_cancelled(), 31.0) is None
    assert state(health) is KeyState.HALF_OPEN and health.available()


def test_a_trial_that_never_reports_stops_blocking_after_the_trial_timeout() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    fail(health, 0.0, times=5)
    health.refresh(30.0)
    health.started(30.0)
    health.refresh(30.0 + POLICY.trial_timeout - 1)
    assert not health.available()
    health.refresh(30.0 + POLICY.trial_timeout)
    assert health.available()


def test_a_429_on_the_trial_cools_the_key_down() -> None:
    health = KeyHealth(1, POLICY, now=0.0)
    fail(health, 0.0, times=5)
    health.refresh(30.0)
    attempt(health, AttemptResult.status(429), 30.0, cooldown=3.0)
    assert state(health) is KeyState.COOLING_DOWN and health.deadline == 33.0


def test_ewma_latency() -> None:
    health = KeyHealth(1, HealthPolicy(ewma_alpha=0.5), now=0.0)
    assert health.ewma_latency is None
    attempt(health, AttemptResult.ok(1.0), 0.0)
    attempt(health, AttemptResult.ok(3.0), 0.0)
    assert health.ewma_latency == pytest.approx(2.0)
    assert health.success_rate(0.0) == 1.0


def test_describe_never_needs_a_secret() -> None:
    assert AttemptResult.status(503).describe() == "HTTP 503"
    assert AttemptResult.timeout("no first byte in 30 s").describe() == "timeout: no first byte in 30 s"
    assert AttemptResult.connect_error().describe() == "connect_error"
    assert AttemptResult.ok(0.1).kind is AttemptKind.OK


results = st.one_of(
    st.builds(AttemptResult.ok, st.floats(0.0, 100.0)),
    st.builds(AttemptResult.status, st.sampled_from([200, 400, 401, 403, 404, 408, 409, 429, 500, 503, 529])),
    st.just(AttemptResult.timeout()),
    st.just(AttemptResult.connect_error()),
    st.just(AttemptResult.stream_error_first_event()),
    st.just(AttemptResult.client_cancelled()),
)


@given(
    steps=st.lists(
        st.tuples(st.floats(0.0, 100.0), results, st.none() | st.floats(0.0, 10**5), st.booleans()),
        max_size=60,
    )
)
def test_invariants_over_any_history(
    steps: list[tuple[float, AttemptResult, float | None, bool]],
) -> None:
    health = KeyHealth(7, POLICY, now=0.0)
    now = 0.0
    for advance, result, cooldown, start in steps:
        now += advance
        transition = health.refresh(now)
        if transition is not None:
            assert transition.old is not transition.new and transition.at == now
        if start:
            health.started(now)
        transition = health.finished(result, now, cooldown=cooldown)
        assert health.in_flight >= 0
        if transition is not None:
            assert transition.new is health.state
        has_deadline = state(health) in (KeyState.COOLING_DOWN, KeyState.EJECTED)
        assert (health.deadline is not None) == has_deadline
        if state(health) is KeyState.EJECTED:
            assert health.deadline is not None
            duration = health.deadline - health.changed_at
            assert POLICY.base_ejection - 1e-6 <= duration <= POLICY.max_ejection + 1e-6
        if state(health) is KeyState.COOLING_DOWN:
            assert health.deadline is not None and health.deadline <= now + POLICY.max_cooldown
        if health.state is not KeyState.HALF_OPEN:
            assert not health.trial_in_flight
