"""The balancer facade: picks over a pool, panic mode, snapshot changes, status, and a state machine over a pool."""

from __future__ import annotations

import email.utils
import json
import logging
import random
from collections import Counter
from dataclasses import replace

import pytest
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.examples import examples
from trioproxy.balancer import (
    AttemptResult,
    Balancer,
    HealthPolicy,
    KeyState,
    RetryPolicy,
    Transition,
    backoff_delay,
    is_retryable,
)
from trioproxy.balancer.strategies import STRATEGY_NAMES
from trioproxy.pricing import PriceTable
from trioproxy.snapshot import GatewayKeyView, Origin, ProviderKeyView, ProviderKind, ProviderView, Snapshot

PROVIDER = ProviderView(
    id=1,
    name="openai",
    kind=ProviderKind.OPENAI,
    origin=Origin("https", "api.openai.com", 443),
    path_prefix="",
    extra_headers=(),
    connect_timeout=10.0,
    first_byte_timeout=60.0,
    idle_timeout=60.0,
    total_timeout=600.0,
    enabled=True,
)
OTHER_PROVIDER = replace(PROVIDER, id=2, name="other")
WALL = 1_722_513_600.0


def key(
    key_id: int, weight: int = 1, *, enabled: bool = True, provider_id: int = 1, secret: str = ""
) -> ProviderKeyView:
    return ProviderKeyView(
        id=key_id,
        name=f"key-{key_id}",
        provider_id=provider_id,
        owner_id=None,
        secret=secret or f"sk-{key_id}",
        weight=weight,
        enabled=enabled,
    )


def gateway(pool: tuple[int, ...], strategy: str = "round_robin", gateway_id: int = 10) -> GatewayKeyView:
    return GatewayKeyView(
        id=gateway_id,
        name=f"gw-{gateway_id}",
        owner_id=None,
        provider_id=1,
        prefix="tp-abcd",
        pool=pool,
        strategy=strategy,
        retry_count=2,
        allowed_models=None,
        expires_at=None,
        enabled=True,
    )


def snapshot(keys: list[ProviderKeyView], gateways: list[GatewayKeyView], version: int = 1) -> Snapshot:
    return Snapshot.build(
        version,
        [PROVIDER, OTHER_PROVIDER],
        keys,
        {f"hash-{g.id}": g for g in gateways},
        PriceTable([]),
    )


def balancer(seed: int = 0) -> Balancer:
    return Balancer(rng=random.Random(seed), wall_clock=lambda: WALL)


def serve(b: Balancer, gk: GatewayKeyView, snap: Snapshot, now: float, result: AttemptResult) -> int:
    pick = b.pick(gk, snap, now=now)
    assert pick is not None
    b.attempt_started(pick.key.id, now=now)
    b.attempt_finished(pick.key.id, result, now=now)
    return pick.key.id


def test_pick_skips_disabled_zero_weight_foreign_and_excluded_keys() -> None:
    keys = [key(1), key(2, enabled=False), key(3, weight=0), key(4, provider_id=2), key(5)]
    gk = gateway((1, 2, 3, 4, 5, 99))  # 99 is not in the snapshot
    snap = snapshot(keys, [gk])
    b = balancer()
    chosen = [b.pick(gk, snap, now=0.0) for _ in range(4)]
    assert [p.key.id for p in chosen if p] == [1, 5, 1, 5]
    pick = b.pick(gk, snap, now=0.0, exclude=frozenset({1}))
    assert pick is not None and pick.key.id == 5
    assert b.pick(gk, snap, now=0.0, exclude=frozenset({1, 5})) is None
    assert b.pick(gateway((2, 3, 4)), snap, now=0.0) is None


def test_a_failing_key_is_ejected_and_the_pool_keeps_serving() -> None:
    keys = [key(1), key(2), key(3)]
    gk = gateway((1, 2, 3))
    snap = snapshot(keys, [gk])
    b = balancer()
    served: Counter[int] = Counter()
    for i in range(60):
        pick = b.pick(gk, snap, now=float(i))
        assert pick is not None and not pick.panic
        b.attempt_started(pick.key.id, now=float(i))
        result = AttemptResult.status(500) if pick.key.id == 2 else AttemptResult.ok(0.1)
        b.attempt_finished(pick.key.id, result, now=float(i))
        served[pick.key.id] += 1
    health = b.key_health(2)
    assert health is not None and health.state in (KeyState.EJECTED, KeyState.HALF_OPEN)
    assert served[2] <= 6  # five failures, then at most one trial after the 30 s ejection
    assert b.transitions[("active", "ejected")] == 1


def test_retry_after_takes_the_key_out_for_exactly_that_long() -> None:
    keys = [key(1), key(2)]
    gk = gateway((1, 2))
    snap = snapshot(keys, [gk])
    b = balancer()
    assert serve(b, gk, snap, 0.0, AttemptResult.status(429, [(b"retry-after", b"2")])) == 1
    picks = [b.pick(gk, snap, now=t / 10) for t in range(0, 20)]
    assert {p.key.id for p in picks if p} == {2}
    pick = b.pick(gk, snap, now=2.0)
    assert pick is not None and pick.key.id == 1  # back, and next in rotation


def test_retry_after_as_an_http_date_uses_the_wall_clock() -> None:
    keys = [key(1), key(2)]
    gk = gateway((1, 2))
    snap = snapshot(keys, [gk])
    b = balancer()
    date = email.utils.formatdate(WALL + 30, usegmt=True).encode()
    serve(b, gk, snap, 100.0, AttemptResult.status(429, [(b"retry-after", date)]))
    health = b.key_health(1)
    assert health is not None and health.deadline == pytest.approx(130.0)


def test_gemini_retry_info_in_the_body() -> None:
    gk = gateway((1, 2))
    snap = snapshot([key(1), key(2)], [gk])
    b = balancer()
    body = b'{"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}'
    serve(b, gk, snap, 0.0, AttemptResult.status(429, [], body))
    health = b.key_health(1)
    assert health is not None and health.deadline == 7.0


def test_panic_mode_picks_the_least_recently_failed_key() -> None:
    keys = [key(1), key(2), key(3)]
    gk = gateway((1, 2, 3))
    snap = snapshot(keys, [gk])
    b = balancer()
    b.attempt_started(3, now=0.0)
    b.attempt_finished(3, AttemptResult.status(401), now=0.0)  # invalid: only as a last resort
    for t, key_id in ((1.0, 1), (2.0, 2)):
        for _ in range(5):
            b.attempt_started(key_id, now=t)
            b.attempt_finished(key_id, AttemptResult.connect_error(), now=t)
    pick = b.pick(gk, snap, now=3.0)
    assert pick is not None and pick.panic and pick.key.id == 1
    b.attempt_started(1, now=3.0)
    b.attempt_finished(1, AttemptResult.status(503), now=4.0)
    pick = b.pick(gk, snap, now=5.0)
    assert pick is not None and pick.panic and pick.key.id == 2
    only_invalid = gateway((3,), gateway_id=11)
    pick = b.pick(only_invalid, snapshot(keys, [gk, only_invalid]), now=5.0)
    assert pick is not None and pick.panic and pick.key.id == 3


def test_panic_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    gk = gateway((1,))
    snap = snapshot([key(1)], [gk])
    b = balancer()
    serve(b, gk, snap, 0.0, AttemptResult.status(429))
    with caplog.at_level(logging.WARNING, logger="trioproxy.balancer.balancer"):
        for t in (1.0, 2.0, 3.0):
            pick = b.pick(gk, snap, now=t)
            assert pick is not None and pick.panic
    assert sum("panic mode" in r.getMessage() for r in caplog.records) == 1


def test_half_open_key_gets_exactly_one_trial() -> None:
    keys = [key(1), key(2)]
    gk = gateway((1, 2), strategy="weighted")
    snap = snapshot(keys, [gk])
    b = balancer()
    for _ in range(5):
        b.attempt_started(1, now=0.0)
        b.attempt_finished(1, AttemptResult.timeout(), now=0.0)
    pick = b.pick(gk, snap, now=30.0)
    assert pick is not None and pick.key.id == 1  # the trial goes first
    b.attempt_started(1, now=30.0)
    assert all(p and p.key.id == 2 for p in (b.pick(gk, snap, now=31.0) for _ in range(5)))
    b.attempt_finished(1, AttemptResult.ok(0.2), now=32.0)
    assert b.key_health(1).state is KeyState.ACTIVE  # type: ignore[union-attr]


def test_key_admissible_refusals_are_skipped_and_never_panic_picked() -> None:
    keys = [key(1), key(2)]
    gk = gateway((1, 2))
    snap = snapshot(keys, [gk])
    b = balancer()
    picks = {b.pick(gk, snap, now=0.0, key_admissible=lambda k: k != 1).key.id for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {2}
    serve(b, gk, snap, 1.0, AttemptResult.status(429))  # key 1 cools down
    assert b.pick(gk, snap, now=1.5, key_admissible=lambda k: k != 2) is not None  # panic on 1 is fine
    assert b.pick(gk, snap, now=1.5, key_admissible=lambda k: False) is None


def test_weighted_pool_splits_exactly_by_weight() -> None:
    gk = gateway((1, 2, 3), strategy="weighted")
    snap = snapshot([key(1, 3), key(2, 2), key(3, 1)], [gk])
    b = balancer()
    counts = Counter(serve(b, gk, snap, i * 0.01, AttemptResult.ok(0.05)) for i in range(600))
    assert counts == {1: 300, 2: 200, 3: 100}


def test_retries_do_not_disturb_the_pools_rotation() -> None:
    gk = gateway((1, 2, 3), strategy="weighted")
    snap = snapshot([key(1, 3), key(2, 2), key(3, 1)], [gk])
    b = balancer()
    firsts = []
    for i in range(60):
        first = b.pick(gk, snap, now=float(i))
        assert first is not None
        firsts.append(first.key.id)
        retry = b.pick(gk, snap, now=float(i), exclude=frozenset({first.key.id}))
        assert retry is not None and retry.key.id != first.key.id
    assert Counter(firsts) == {1: 30, 2: 20, 3: 10}


def test_snapshot_changes_drop_add_reset_keys() -> None:
    gk = gateway((1, 2))
    snap = snapshot([key(1), key(2)], [gk])
    b = balancer()
    b.pick(gk, snap, now=0.0)
    b.attempt_started(1, now=0.0)
    b.attempt_finished(1, AttemptResult.status(401), now=0.0)
    b.attempt_started(2, now=0.0)
    b.attempt_finished(2, AttemptResult.status(403), now=0.0)
    assert b.key_health(1).state is KeyState.INVALID  # type: ignore[union-attr]
    # key 1 disabled, key 2 gets a new secret, key 3 arrives
    gk2 = gateway((1, 2, 3))
    b.pick(gk2, snapshot([key(1, enabled=False), key(2, secret="sk-new"), key(3)], [gk2], 2), now=1.0)
    assert b.key_health(2).state is KeyState.ACTIVE  # type: ignore[union-attr]
    assert b.key_health(1).state is KeyState.INVALID  # type: ignore[union-attr]
    b.pick(gk2, snapshot([key(1), key(2, secret="sk-new"), key(3)], [gk2], 3), now=2.0)
    assert b.key_health(1).state is KeyState.ACTIVE  # type: ignore[union-attr]
    assert b.key_health(3).state is KeyState.ACTIVE  # type: ignore[union-attr]
    gk3 = gateway((3,))
    b.pick(gk3, snapshot([key(3)], [gk3], 4), now=3.0)
    assert b.key_health(1) is None and b.key_health(2) is None
    b.attempt_finished(1, AttemptResult.ok(0.1), now=3.0)  # a straggler of a removed key is ignored
    assert b.key_health(1) is None


def test_status_is_json_ready_and_explains_each_key() -> None:
    gk = gateway((1, 2, 3), strategy="health_best")
    snap = snapshot([key(1), key(2), key(3, weight=0)], [gk])
    b = balancer()
    b.pick(gk, snap, now=0.0)
    b.attempt_started(1, now=0.0)
    b.attempt_finished(1, AttemptResult.ok(0.25), now=0.0)
    b.attempt_started(2, now=0.0)
    b.attempt_finished(2, AttemptResult.status(429, [(b"retry-after", b"20")]), now=1.0)
    b.attempt_started(1, now=2.0)
    pools = b.status(snap, now=6.0)
    json.dumps(pools)
    (pool,) = pools
    assert pool["strategy"] == "health_best" and pool["gateway_key_id"] == 10
    assert pool["usable_keys"] == 2 and pool["available_keys"] == 1 and not pool["panic"]
    by_id = {k["id"]: k for k in pool["keys"]}
    assert by_id[1]["state"] == "active" and by_id[1]["in_flight"] == 1
    assert by_id[1]["ewma_latency_ms"] == 250.0 and by_id[1]["success_rate"] == 1.0
    assert by_id[2]["state"] == "cooling_down" and by_id[2]["deadline_in"] == 15.0
    assert by_id[2]["last_error"] == "HTTP 429" and by_id[2]["last_error_ago"] == 5.0
    assert "rate limited" in by_id[2]["reason"]
    assert by_id[3]["weight"] == 0
    assert all("secret" not in k and "sk-" not in json.dumps(k) for k in pool["keys"])


def test_transitions_are_counted_logged_and_published(caplog: pytest.LogCaptureFixture) -> None:
    gk = gateway((1,))
    snap = snapshot([key(1)], [gk])
    b = balancer()
    seen: list[Transition] = []
    b.subscribe(seen.append)
    with caplog.at_level(logging.INFO, logger="trioproxy.balancer.balancer"):
        serve(b, gk, snap, 0.0, AttemptResult.status(429, [(b"retry-after", b"1")]))
        b.pick(gk, snap, now=1.0)
    assert [(t.old, t.new) for t in seen] == [
        (KeyState.ACTIVE, KeyState.COOLING_DOWN),
        (KeyState.COOLING_DOWN, KeyState.ACTIVE),
    ]
    assert b.transitions == {("active", "cooling_down"): 1, ("cooling_down", "active"): 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any("provider key 1 (key-1): active -> cooling_down for 1.0 s" in m for m in messages)
    assert b.changed_at(1) == WALL


def test_retry_budget_is_fed_by_first_attempts_only() -> None:
    b = Balancer(retry_policy=RetryPolicy(budget_burst=1.0, budget_floor_per_second=0.0, budget_ratio=0.5))
    gk = gateway((1,))
    b.pick(gk, snapshot([key(1)], [gk]), now=0.0)
    assert b.retry_allowed(1, now=0.0)
    assert not b.retry_allowed(1, now=0.0)
    b.attempt_started(1, now=0.0, retry=True)
    assert not b.retry_allowed(1, now=0.0)
    b.attempt_started(1, now=0.0)
    b.attempt_started(1, now=0.0)
    assert b.retry_allowed(1, now=0.0)


def test_reset_mark_valid_and_mark_invalid() -> None:
    gk = gateway((1, 2))
    snap = snapshot([key(1), key(2)], [gk])
    b = balancer()
    b.pick(gk, snap, now=0.0)
    b.mark_invalid(1, "active check: HTTP 401", now=1.0)
    assert b.key_health(1).state is KeyState.INVALID  # type: ignore[union-attr]
    b.mark_valid(1, now=2.0)
    assert b.key_health(1).state is KeyState.ACTIVE  # type: ignore[union-attr]
    for _ in range(5):
        b.attempt_started(2, now=3.0)
        b.attempt_finished(2, AttemptResult.status(502), now=3.0)
    b.reset_key(2)  # the time of the latest call is used
    health = b.key_health(2)
    assert health is not None and health.state is KeyState.ACTIVE and health.changed_at == 3.0
    assert health.ejections == 0


def test_unknown_strategy_falls_back_to_round_robin_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    gk = gateway((1, 2), strategy="fastest")
    snap = snapshot([key(1), key(2)], [gk])
    b = balancer()
    with caplog.at_level(logging.WARNING):
        assert [b.pick(gk, snap, now=0.0).key.id for _ in range(3)] == [1, 2, 1]  # type: ignore[union-attr]
    assert sum("unknown balancing strategy" in r.getMessage() for r in caplog.records) == 1
    assert b.status(snap, now=0.0)[0]["effective_strategy"] == "round_robin"


def test_apply_remote_adopts_only_newer_states() -> None:
    gk = gateway((1,))
    snap = snapshot([key(1)], [gk])
    b = balancer()
    assert not b.apply_remote(
        1, KeyState.EJECTED, deadline_in=30, reason="r", changed_at=WALL + 1, ejections=1, now=0.0
    )  # key not known yet: this process has not seen a snapshot
    b.pick(gk, snap, now=0.0)
    assert b.apply_remote(
        1, KeyState.EJECTED, deadline_in=30, reason="r", changed_at=WALL + 1, ejections=2, now=5.0
    )
    health = b.key_health(1)
    assert health is not None and health.state is KeyState.EJECTED and health.deadline == 35.0
    assert health.ejections == 2
    assert not b.apply_remote(
        1, KeyState.ACTIVE, deadline_in=None, reason="old", changed_at=WALL, ejections=0, now=6.0
    )
    assert health.state is KeyState.EJECTED
    assert b.transitions[("active", "ejected")] == 1


def test_keys_to_check() -> None:
    gk = gateway((1, 2, 3, 4, 5))
    snap = snapshot([key(1), key(2), key(3), key(4), key(5, enabled=False)], [gk])
    b = balancer()
    assert sorted(b.keys_to_check(snap, now=0.0, idle_after=300)) == [1, 2, 3, 4]  # never used
    for key_id in (1, 2, 3, 4):
        b.attempt_started(key_id, now=0.0)
        b.attempt_finished(key_id, AttemptResult.ok(0.1), now=0.0)
    for _ in range(5):
        b.attempt_started(2, now=10.0)
        b.attempt_finished(2, AttemptResult.status(500), now=10.0)
    b.attempt_started(3, now=10.0)
    b.attempt_finished(3, AttemptResult.status(429), now=10.0)
    b.attempt_started(4, now=10.0)
    b.attempt_finished(4, AttemptResult.status(401), now=10.0)
    assert sorted(b.keys_to_check(snap, now=11.0, idle_after=300)) == [2, 4]
    assert sorted(b.keys_to_check(snap, now=301.0, idle_after=300)) == [1, 2, 4]


# -- a state machine over one pool ----------------------------------------------------------------------------

FAILURES = [
    AttemptResult.status(500),
    AttemptResult.status(502),
    AttemptResult.status(503),
    AttemptResult.status(529),
    AttemptResult.status(408),
    AttemptResult.timeout(),
    AttemptResult.connect_error(),
    AttemptResult.stream_error_first_event(),
]


class PoolMachine(RuleBasedStateMachine):
    """Random traffic, failures, rate limits, time and configuration changes over one pool, timed by trio's
    MockClock; after every step the pool's picks and states must follow the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()
        self.balancer = Balancer(rng=random.Random(0), wall_clock=lambda: WALL + self.clock.current_time())
        self.keys: dict[int, ProviderKeyView] = {}
        self.pool: list[int] = []
        self.strategy = "round_robin"
        self.next_id = 1
        self.in_flight: list[int] = []
        self.version = 0
        self.snap = snapshot([], [])
        self.gk = gateway(())

    @property
    def now(self) -> float:
        return self.clock.current_time()

    def rebuild(self) -> None:
        self.version += 1
        self.gk = gateway(tuple(self.pool), self.strategy)
        self.snap = snapshot(list(self.keys.values()), [self.gk], self.version)

    @initialize(
        strategy=st.sampled_from(STRATEGY_NAMES), weights=st.lists(st.integers(0, 4), min_size=1, max_size=5)
    )
    def setup(self, strategy: str, weights: list[int]) -> None:
        self.strategy = strategy
        for weight in weights:
            self.add_key(weight)

    def eligible(self) -> list[int]:
        return [k for k in self.pool if self.keys[k].enabled and self.keys[k].weight > 0]

    def checked_pick(self) -> int | None:
        eligible = self.eligible()
        pick = self.balancer.pick(self.gk, self.snap, now=self.now)
        if not eligible:
            assert pick is None
            return None
        assert pick is not None and pick.key.id in eligible
        states = {k: self.balancer.key_health(k) for k in eligible}
        available = [k for k, h in states.items() if h is not None and h.available()]
        if available:
            assert not pick.panic and pick.key.id in available
        else:
            assert pick.panic
            chosen = states[pick.key.id]
            assert chosen is not None

            def order(k: int) -> tuple[bool, float]:
                h = states[k]
                assert h is not None
                last = h.last_failure_at if h.last_failure_at is not None else float("-inf")
                return (h.state is KeyState.INVALID, last)

            assert order(pick.key.id) == min(order(k) for k in eligible)
        return pick.key.id

    @rule(weight=st.integers(0, 4))
    def add_key(self, weight: int) -> None:
        key_id = self.next_id
        self.next_id += 1
        self.keys[key_id] = key(key_id, weight)
        self.pool.append(key_id)
        self.rebuild()

    @precondition(lambda self: len(self.pool) > 1)
    @rule(data=st.data())
    def remove_key(self, data: st.DataObject) -> None:
        key_id = data.draw(st.sampled_from(self.pool))
        self.pool.remove(key_id)
        del self.keys[key_id]
        self.rebuild()

    @rule(data=st.data())
    def toggle_key(self, data: st.DataObject) -> None:
        key_id = data.draw(st.sampled_from(self.pool))
        self.keys[key_id] = replace(self.keys[key_id], enabled=not self.keys[key_id].enabled)
        self.rebuild()

    @rule(latency=st.floats(0.01, 5.0))
    def success(self, latency: float) -> None:
        key_id = self.checked_pick()
        if key_id is not None:
            self.balancer.attempt_started(key_id, now=self.now)
            self.balancer.attempt_finished(key_id, AttemptResult.ok(latency), now=self.now)

    @rule(result=st.sampled_from(FAILURES), times=st.integers(1, 6))
    def failure(self, result: AttemptResult, times: int) -> None:
        for _ in range(times):
            key_id = self.checked_pick()
            if key_id is not None:
                self.balancer.attempt_started(key_id, now=self.now)
                self.balancer.attempt_finished(key_id, result, now=self.now)

    @rule(code=st.sampled_from([401, 403]))
    def rejected(self, code: int) -> None:
        key_id = self.checked_pick()
        if key_id is not None:
            self.balancer.attempt_started(key_id, now=self.now)
            self.balancer.attempt_finished(key_id, AttemptResult.status(code), now=self.now)
            health = self.balancer.key_health(key_id)
            assert health is not None and health.state is KeyState.INVALID

    @rule(retry_after=st.none() | st.integers(0, 120))
    def rate_limited(self, retry_after: int | None) -> None:
        key_id = self.checked_pick()
        if key_id is None:
            return
        headers = [] if retry_after is None else [(b"retry-after", str(retry_after).encode())]
        self.balancer.attempt_started(key_id, now=self.now)
        self.balancer.attempt_finished(key_id, AttemptResult.status(429, headers), now=self.now)

    @rule()
    def start_attempt(self) -> None:
        key_id = self.checked_pick()
        if key_id is not None:
            self.balancer.attempt_started(key_id, now=self.now)
            self.in_flight.append(key_id)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), ok=st.booleans())
    def finish_attempt(self, data: st.DataObject, ok: bool) -> None:
        key_id = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        result = AttemptResult.ok(0.5) if ok else AttemptResult.status(503)
        self.balancer.attempt_finished(key_id, result, now=self.now)

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.0, 5.0, 29.9, 30.0, 60.0, 600.0]))
    def advance(self, seconds: float) -> None:
        self.clock.jump(seconds)

    @precondition(lambda self: self.pool)
    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        key_id = data.draw(st.sampled_from(self.pool))
        self.balancer.reset_key(key_id, now=self.now)
        health = self.balancer.key_health(key_id)
        assert health is not None and health.state is KeyState.ACTIVE

    @invariant()
    def states_and_deadlines(self) -> None:
        now = self.now
        pools = self.balancer.status(self.snap, now=now)
        policy: HealthPolicy = self.balancer.health_policy
        for key_id in list(self.keys):
            health = self.balancer.key_health(key_id)
            if health is None:
                continue
            has_deadline = health.state in (KeyState.COOLING_DOWN, KeyState.EJECTED)
            assert (health.deadline is not None) == has_deadline
            if health.deadline is not None:
                assert health.deadline > now  # an expired deadline has been acted on
            if health.state is KeyState.EJECTED:
                assert health.deadline is not None
                duration = health.deadline - health.changed_at
                assert policy.base_ejection - 1e-6 <= duration <= policy.max_ejection + 1e-6
            if health.state is KeyState.COOLING_DOWN:
                assert health.deadline is not None and health.deadline <= now + policy.max_cooldown
            assert health.in_flight == self.in_flight.count(key_id)
        for gone in range(1, self.next_id):
            if gone not in self.keys:
                assert self.balancer.key_health(gone) is None
        if pools:
            (pool,) = pools
            assert pool["panic"] == (pool["usable_keys"] > 0 and pool["available_keys"] == 0)
            json.dumps(pool)

    @invariant()
    def a_pick_follows_the_rules(self) -> None:
        self.checked_pick()  # a pick without an attempt changes no health


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=examples(60), stateful_step_count=40, deadline=None)


def test_a_retry_prefers_proven_keys_to_a_half_open_trial() -> None:
    gk = gateway((1, 2, 3))
    snap = snapshot([key(1), key(2), key(3)], [gk])
    b = balancer()
    b.pick(gk, snap, now=0.0)
    for _ in range(5):
        b.attempt_started(3, now=0.0)
        b.attempt_finished(3, AttemptResult.status(500), now=0.0)
    retry = b.pick(gk, snap, now=31.0, exclude=frozenset({1}))
    assert retry is not None and retry.key.id == 2  # key 3 is half-open: not for a request that failed once
    only_trial = b.pick(gk, snap, now=31.0, exclude=frozenset({1, 2}))
    assert only_trial is not None and only_trial.key.id == 3 and not only_trial.panic
    first = b.pick(gk, snap, now=31.0)
    assert first is not None and first.key.id == 3  # a first attempt takes the trial


def test_a_retry_loop_keeps_every_request_served_while_one_key_fails_and_one_is_rate_limited() -> None:
    """The forwarder's loop in miniature: key 1 answers 500, key 2 answers 429 (Retry-After: 5), key 3 works."""
    gk = replace(gateway((1, 2, 3), strategy="weighted"), retry_count=2)
    snap = snapshot([key(1, 3), key(2, 2), key(3, 1)], [gk])
    b = balancer(seed=4)
    rng = random.Random(4)
    upstream_calls: Counter[int] = Counter()
    served = 0
    now = 0.0
    for _ in range(600):
        now += 0.05
        tried: set[int] = set()
        for attempt in range(gk.retry_count + 1):
            pick = b.pick(gk, snap, now=now, exclude=frozenset(tried))
            assert pick is not None
            key_id = pick.key.id
            tried.add(key_id)
            b.attempt_started(key_id, now=now, retry=attempt > 0)
            upstream_calls[key_id] += 1
            if key_id == 1:
                result = AttemptResult.status(500)
            elif key_id == 2:
                result = AttemptResult.status(429, [(b"retry-after", b"5")])
            else:
                result = AttemptResult.ok(0.2)
            b.attempt_finished(key_id, result, now=now)
            if result.kind.value == "ok":
                served += 1
                break
            assert is_retryable(result, committed=False)
            assert b.retry_allowed(gk.provider_id, now=now)
            assert backoff_delay(attempt + 1, rng) <= 8.0
    assert served == 600
    # The failing key is tried 5 times, then once per ejection (30 s, 60 s): 30 s of traffic is 600 requests.
    assert upstream_calls[1] <= 7
    assert upstream_calls[2] <= 1 + 30 // 5  # once per 5 s cooldown
    (pool,) = b.status(snap, now=now)
    by_id = {k["id"]: k for k in pool["keys"]}
    assert by_id[1]["state"] in ("ejected", "half_open") and "HTTP 500" in (by_id[1]["last_error"] or "")
    assert by_id[2]["last_error"] == "HTTP 429"
    assert by_id[3]["state"] == "active" and by_id[3]["success_rate"] == 1.0
