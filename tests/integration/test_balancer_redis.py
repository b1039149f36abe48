"""Key states shared across two balancers through the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Awaitable, Callable

import coredis
import pytest
import trio

from trioproxy.balancer import AttemptResult, Balancer, KeyState
from trioproxy.balancer.shared_state import SharedKeyStates
from trioproxy.pricing import PriceTable
from trioproxy.snapshot import GatewayKeyView, Origin, ProviderKeyView, ProviderKind, ProviderView, Snapshot

pytestmark = pytest.mark.redis

POLL = 0.02


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
KEYS = [
    ProviderKeyView(
        id=i, name=f"key-{i}", provider_id=1, owner_id=None, secret=f"sk-{i}", weight=1, enabled=True
    )
    for i in (1, 2, 3)
]
GATEWAY = GatewayKeyView(
    id=10,
    name="gw",
    owner_id=None,
    provider_id=1,
    prefix="tp-abcd",
    pool=(1, 2, 3),
    strategy="round_robin",
    retry_count=2,
    allowed_models=None,
    expires_at=None,
    enabled=True,
)
SNAPSHOT = Snapshot.build(1, [PROVIDER], KEYS, {"h": GATEWAY}, PriceTable([]))


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


def state_of(balancer: Balancer, key_id: int) -> KeyState | None:
    health = balancer.key_health(key_id)
    return health.state if health is not None else None


def fail(balancer: Balancer, key_id: int, result: AttemptResult, times: int = 1) -> None:
    for _ in range(times):
        now = trio.current_time()
        balancer.attempt_started(key_id, now=now)
        balancer.attempt_finished(key_id, result, now=now)


async def with_two_instances(
    redis_url: str,
    prefix: str,
    body: Callable[[Balancer, Balancer, SharedKeyStates, SharedKeyStates], Awaitable[None]],
) -> None:
    a, b = Balancer(), Balancer()
    for balancer in (a, b):
        balancer.pick(GATEWAY, SNAPSHOT, now=trio.current_time())  # both know the keys
    share_a = SharedKeyStates(a, redis_url, prefix=prefix, poll_interval=POLL, instance_id="a")
    share_b = SharedKeyStates(b, redis_url, prefix=prefix, poll_interval=POLL, instance_id="b")
    async with trio.open_nursery() as nursery:
        await nursery.start(share_a.run)
        await nursery.start(share_b.run)
        await body(a, b, share_a, share_b)
        nursery.cancel_scope.cancel()


async def test_an_ejection_on_one_instance_reaches_the_other(redis_url: str, redis_prefix: str) -> None:
    async def body(a: Balancer, b: Balancer, share_a: SharedKeyStates, share_b: SharedKeyStates) -> None:
        fail(a, 2, AttemptResult.status(503), times=5)
        assert state_of(a, 2) is KeyState.EJECTED
        await eventually(lambda: state_of(b, 2) is KeyState.EJECTED)
        health_a, health_b = a.key_health(2), b.key_health(2)
        assert health_a is not None and health_b is not None and health_a.deadline and health_b.deadline
        # Both count the 30 s from the same moment, within the time the change took to travel.
        assert abs(health_b.deadline - health_a.deadline) < 1.0
        assert health_b.ejections == 1
        assert b.transitions[("active", "ejected")] == 1
        # B no longer picks the key either.
        picks = {b.pick(GATEWAY, SNAPSHOT, now=trio.current_time()).key.id for _ in range(6)}  # type: ignore[union-attr]
        assert picks == {1, 3}
        assert share_a.published >= 1 and share_b.applied >= 1

    await with_two_instances(redis_url, redis_prefix, body)


async def test_cooldown_invalid_and_reset_travel_and_nothing_echoes(
    redis_url: str, redis_prefix: str
) -> None:
    async def body(a: Balancer, b: Balancer, share_a: SharedKeyStates, share_b: SharedKeyStates) -> None:
        fail(a, 1, AttemptResult.status(429, [(b"retry-after", b"30")]))
        fail(b, 3, AttemptResult.status(401))
        await eventually(
            lambda: state_of(b, 1) is KeyState.COOLING_DOWN and state_of(a, 3) is KeyState.INVALID
        )
        health = b.key_health(1)
        assert health is not None and health.deadline is not None
        assert 29.0 < health.deadline - trio.current_time() <= 30.0
        b.reset_key(3, now=trio.current_time())  # an admin on instance B resets the key
        await eventually(lambda: state_of(a, 3) is KeyState.ACTIVE)
        await trio.sleep(10 * POLL)
        # Each change crossed once: applying a remote change never publishes it again.
        assert share_a.published == 1 and share_b.published == 2
        assert a.transitions[("invalid", "active")] == 1
        assert b.transitions[("active", "cooling_down")] == 1

    await with_two_instances(redis_url, redis_prefix, body)


async def _eject_key_1_and_publish(nursery: trio.Nursery, redis_url: str, redis_prefix: str) -> None:
    """An instance that ejects provider key 1 and has published it."""
    a = Balancer()
    a.pick(GATEWAY, SNAPSHOT, now=trio.current_time())
    share_a = SharedKeyStates(a, redis_url, prefix=redis_prefix, poll_interval=POLL)
    await nursery.start(share_a.run)
    fail(a, 1, AttemptResult.connect_error(), times=5)
    await eventually(lambda: share_a.published == 1)


async def test_a_late_instance_learns_the_current_states(redis_url: str, redis_prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        await _eject_key_1_and_publish(nursery, redis_url, redis_prefix)
        late = Balancer()
        share_late = SharedKeyStates(late, redis_url, prefix=redis_prefix, poll_interval=POLL)
        await nursery.start(share_late.run)
        await trio.sleep(5 * POLL)  # polls while this instance has no snapshot yet, so knows no key
        assert late.key_ids() == []
        late.pick(GATEWAY, SNAPSHOT, now=trio.current_time())  # its first request brings the snapshot
        await eventually(lambda: state_of(late, 1) is KeyState.EJECTED)
        nursery.cancel_scope.cancel()


async def test_an_instance_that_follows_its_snapshot_learns_the_states_before_its_first_request(
    redis_url: str, redis_prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        await _eject_key_1_and_publish(nursery, redis_url, redis_prefix)
        late = Balancer()
        share_late = SharedKeyStates(
            late, redis_url, prefix=redis_prefix, poll_interval=POLL, current_snapshot=lambda: SNAPSHOT
        )
        await nursery.start(share_late.run)
        await eventually(lambda: state_of(late, 1) is KeyState.EJECTED)  # no request has been picked
        nursery.cancel_scope.cancel()


async def test_an_older_remote_state_does_not_overwrite_a_newer_local_one(
    redis_url: str, redis_prefix: str
) -> None:
    async def body(a: Balancer, b: Balancer, share_a: SharedKeyStates, share_b: SharedKeyStates) -> None:
        fail(a, 2, AttemptResult.status(500), times=5)
        await eventually(lambda: state_of(b, 2) is KeyState.EJECTED)
        b.reset_key(2, now=trio.current_time())
        await eventually(lambda: state_of(a, 2) is KeyState.ACTIVE)
        await trio.sleep(10 * POLL)
        assert (
            state_of(b, 2) is KeyState.ACTIVE
        )  # A's older ejection, still in Redis history, is not re-applied

    await with_two_instances(redis_url, redis_prefix, body)


# Refused connections must leave nothing for the garbage collector (trioproxy/redis_client.py closes coredis's
# buffer streams): the gc.collect() below, under filterwarnings=error, fails this test if they leak again.
async def test_redis_down_is_survived_and_changes_are_sent_when_it_is_back(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    a = Balancer()
    a.pick(GATEWAY, SNAPSHOT, now=trio.current_time())
    share = SharedKeyStates(
        a, f"redis://127.0.0.1:{dead_port}/0", prefix=redis_prefix, poll_interval=POLL, retry_interval=0.05
    )
    with caplog.at_level(logging.WARNING, logger="trioproxy.balancer.shared_state"):
        async with trio.open_nursery() as nursery:
            await nursery.start(share.run)
            fail(a, 1, AttemptResult.status(503), times=5)
            await trio.sleep(0.3)  # several reconnection attempts
            assert state_of(a, 1) is KeyState.EJECTED  # balancing goes on regardless
            assert share.published == 0
            nursery.cancel_scope.cancel()
    gc.collect()
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per attempt
    # The same instance pointed at a live Redis sends what it queued.
    share._url = redis_url
    async with trio.open_nursery() as nursery:
        await nursery.start(share.run)
        await eventually(lambda: share.published == 1)
        nursery.cancel_scope.cancel()
    client: coredis.Redis[str] = coredis.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        stored = await client.hgetall(share.state_key(1))
        ttl = await client.ttl(share.state_key(1))
    assert stored["state"] == "ejected" and stored["origin"] == share.instance_id
    assert float(stored["deadline"]) - float(stored["changed_at"]) == pytest.approx(30.0)
    assert 0 < ttl <= 24 * 3600 + 31


async def test_cancellation_is_prompt(redis_url: str, redis_prefix: str) -> None:
    share = SharedKeyStates(Balancer(), redis_url, prefix=redis_prefix, poll_interval=60.0)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(share.run)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
