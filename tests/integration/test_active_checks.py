"""Token-free key tests against the fake upstream on 127.0.0.1 (it lists models and answers 401 to unknown keys)."""

from __future__ import annotations

import itertools
import random
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest
import trio
import trustme

from trioproxy.balancer import AttemptResult, Balancer, KeyState
from trioproxy.balancer.active_checks import (
    ActiveChecker,
    ActiveCheckSettings,
    CheckOutcome,
    CheckSchedule,
)
from trioproxy.pricing import PriceTable
from trioproxy.snapshot import GatewayKeyView, Origin, ProviderKeyView, ProviderKind, ProviderView, Snapshot
from trioproxy.testing import FakeUpstream, Fault

GOOD = "sk-upstream-test"
FAST = ActiveCheckSettings(interval=0.05, jitter=0.2, idle_after=3600.0, timeout=2.0, tick=0.01)


def provider(port: int, kind: ProviderKind = ProviderKind.OPENAI, **changes: object) -> ProviderView:
    view = ProviderView(
        id=1,
        name=kind.value,
        kind=kind,
        origin=Origin("http", "127.0.0.1", port),
        path_prefix="",
        extra_headers=(("x-team", "blue"),),
        connect_timeout=5.0,
        first_byte_timeout=5.0,
        idle_timeout=5.0,
        total_timeout=10.0,
        enabled=True,
    )
    return replace(view, **changes)  # type: ignore[arg-type]


def key(key_id: int, secret: str = GOOD, *, enabled: bool = True) -> ProviderKeyView:
    return ProviderKeyView(
        id=key_id,
        name=f"key-{key_id}",
        provider_id=1,
        owner_id=None,
        secret=secret,
        weight=1,
        enabled=enabled,
    )


def snapshot(view: ProviderView, keys: list[ProviderKeyView]) -> Snapshot:
    gateway = GatewayKeyView(
        id=10,
        name="gw",
        owner_id=None,
        provider_id=1,
        prefix="tp-abcd",
        pool=tuple(k.id for k in keys),
        strategy="round_robin",
        retry_count=1,
        allowed_models=None,
        expires_at=None,
        enabled=True,
    )
    return Snapshot.build(1, [view], keys, {"h": gateway}, PriceTable([]))


@dataclass
class Rig:
    fake: FakeUpstream
    port: int
    balancer: Balancer
    nursery: trio.Nursery

    def checker(
        self,
        snap: Snapshot | Callable[[], Snapshot],
        *,
        allow_private: bool = True,
        settings: ActiveCheckSettings = FAST,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ActiveChecker:
        source = snap if callable(snap) else (lambda: snap)
        return ActiveChecker(
            self.balancer,
            source,
            allow_private=allow_private,
            user_agent="trioproxy-test",
            settings=settings,
            ssl_context=ssl_context,
            rng=random.Random(3),
        )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    fake = FakeUpstream()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake.serve)
        yield Rig(fake, port, Balancer(rng=random.Random(1)), nursery)
        nursery.cancel_scope.cancel()


def eject(balancer: Balancer, snap: Snapshot, key_id: int) -> None:
    balancer.keys_to_check(snap, now=trio.current_time(), idle_after=1.0)  # the balancer learns the snapshot
    for _ in range(5):
        now = trio.current_time()
        balancer.attempt_started(key_id, now=now)
        balancer.attempt_finished(key_id, AttemptResult.status(503), now=now)
    health = balancer.key_health(key_id)
    assert health is not None and health.state is KeyState.EJECTED


def state(balancer: Balancer, key_id: int) -> KeyState | None:
    health = balancer.key_health(key_id)
    return health.state if health is not None else None


async def started(rig: Rig, checker: ActiveChecker) -> None:
    await rig.nursery.start(checker.run)


@pytest.mark.parametrize(
    ("kind", "path", "auth_header", "auth_value"),
    [
        (ProviderKind.OPENAI, "/v1/models", "authorization", f"Bearer {GOOD}"),
        (ProviderKind.ANTHROPIC, "/v1/models", "x-api-key", GOOD),
        (ProviderKind.GEMINI, "/v1beta/models", "x-goog-api-key", GOOD),
    ],
)
async def test_a_passing_key_test_brings_an_ejected_key_back(
    rig: Rig, kind: ProviderKind, path: str, auth_header: str, auth_value: str
) -> None:
    snap = snapshot(provider(rig.port, kind), [key(1)])
    eject(rig.balancer, snap, 1)
    checker = rig.checker(snap)
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    assert result is not None and result.outcome is CheckOutcome.VALID and result.status == 200
    assert state(rig.balancer, 1) is KeyState.ACTIVE
    (request,) = rig.fake.captured
    assert request.method == "GET" and request.path == path and request.body == b""
    assert request.header(auth_header) == auth_value
    assert request.header("x-team") == "blue"  # the provider's extra headers
    assert request.header("user-agent") == "trioproxy-test"
    if kind is ProviderKind.ANTHROPIC:
        assert request.header("anthropic-version") == "2023-06-01"


async def test_a_revoked_key_becomes_invalid_and_a_fixed_one_valid_again(rig: Rig) -> None:
    snap = snapshot(provider(rig.port), [key(1, "sk-revoked")])
    checker = rig.checker(snap)
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    assert result is not None and result.outcome is CheckOutcome.REJECTED and result.status == 401
    assert state(rig.balancer, 1) is KeyState.INVALID
    health = rig.balancer.key_health(1)
    assert health is not None and health.last_error == "key test: provider rejected the key (HTTP 401)"
    rig.fake.accepted_keys = frozenset({GOOD, "sk-revoked"})  # the provider re-enabled it
    with trio.fail_after(5):
        await checker.check_key(snap, 1)
    assert state(rig.balancer, 1) is KeyState.ACTIVE


async def test_an_inconclusive_test_changes_no_state(rig: Rig) -> None:
    snap = snapshot(provider(rig.port), [key(1)])
    eject(rig.balancer, snap, 1)
    rig.fake.add_fault(Fault(status=503))
    checker = rig.checker(snap)
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    assert result is not None and result.outcome is CheckOutcome.INCONCLUSIVE and result.status == 503
    assert state(rig.balancer, 1) is KeyState.EJECTED
    health = rig.balancer.key_health(1)
    assert health is not None and health.last_error == "key test: model list answered HTTP 503"


async def test_a_slow_provider_times_out(rig: Rig) -> None:
    snap = snapshot(provider(rig.port), [key(1)])
    rig.fake.add_fault(Fault(first_byte_delay=30.0))
    checker = rig.checker(snap, settings=replace(FAST, timeout=0.2))
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    assert result is not None and result.outcome is CheckOutcome.INCONCLUSIVE
    assert result.detail == "no answer within 0.2 s"


async def test_the_ssrf_guard_refuses_private_addresses(rig: Rig) -> None:
    snap = snapshot(provider(rig.port), [key(1)])
    eject(rig.balancer, snap, 1)
    checker = rig.checker(snap, allow_private=False)
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    assert result is not None and result.outcome is CheckOutcome.INCONCLUSIVE
    assert "not allowed" in result.detail
    assert rig.fake.captured == [] and rig.fake.closed_connections == 0  # no connection was even opened
    assert state(rig.balancer, 1) is KeyState.EJECTED


async def test_the_providers_path_prefix_is_used(rig: Rig) -> None:
    snap = snapshot(provider(rig.port, path_prefix="/api"), [key(1)])
    checker = rig.checker(snap)
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    (request,) = rig.fake.captured
    assert request.path == "/api/v1/models"
    assert result is not None and result.outcome is CheckOutcome.INCONCLUSIVE and result.status == 404


async def test_disabled_keys_and_providers_are_not_tested(rig: Rig) -> None:
    snap = snapshot(provider(rig.port), [key(1, enabled=False)])
    checker = rig.checker(snap)
    await started(rig, checker)
    assert await checker.check_key(snap, 1) is None
    assert await checker.check_key(snap, 99) is None
    off = snapshot(provider(rig.port, enabled=False), [key(1)])
    assert await checker.check_key(off, 1) is None
    assert rig.fake.captured == []


async def test_tls_keeps_verifying_the_configured_host_name(rig: Rig) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    tls_fake = FakeUpstream()
    tls_port = await rig.nursery.start(
        lambda task_status: tls_fake.serve(ssl_context=server_context, task_status=task_status)
    )
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    view = provider(tls_port, origin=Origin("https", "localhost", tls_port))
    snap = snapshot(view, [key(1)])
    checker = rig.checker(snap, ssl_context=client_context)
    await started(rig, checker)
    with trio.fail_after(5):
        result = await checker.check_key(snap, 1)
    assert result is not None and result.outcome is CheckOutcome.VALID, result
    wrong_name = snapshot(provider(tls_port, origin=Origin("https", "127.0.0.1", tls_port)), [key(1)])
    with trio.fail_after(5):
        result = await checker.check_key(wrong_name, 1)
    assert result is not None and result.outcome is CheckOutcome.INCONCLUSIVE  # certificate is for localhost


async def test_the_background_loop_tests_ejected_keys_and_leaves_busy_ones_alone(rig: Rig) -> None:
    keys = [key(1), key(2, "sk-revoked"), key(3)]
    snap = snapshot(provider(rig.port), keys)
    eject(rig.balancer, snap, 1)
    now = trio.current_time()
    rig.balancer.attempt_started(3, now=now)  # in use: not idle
    rig.balancer.attempt_started(2, now=now)
    rig.balancer.attempt_finished(2, AttemptResult.ok(0.1), now=now)  # recently used: not idle
    checker = rig.checker(snap, settings=replace(FAST, idle_after=0.3))
    await started(rig, checker)
    with trio.fail_after(5):
        while state(rig.balancer, 1) is not KeyState.ACTIVE:
            await trio.sleep(0.01)
    assert {r.header("authorization") for r in rig.fake.captured} == {f"Bearer {GOOD}"}  # key 1 only, so far
    with trio.fail_after(5):  # key 2 goes idle, gets tested, and turns out revoked
        while state(rig.balancer, 2) is not KeyState.INVALID:
            await trio.sleep(0.01)
    tested = {r.header("authorization") for r in rig.fake.captured}
    assert tested == {f"Bearer {GOOD}", "Bearer sk-revoked"}
    health = rig.balancer.key_health(3)
    assert health is not None and health.in_flight == 1
    assert checker.checks_run >= 2


def test_schedule_spreads_first_tests_and_jitters_the_rest() -> None:
    settings = ActiveCheckSettings(interval=60.0, jitter=0.2)
    schedule = CheckSchedule(settings, random.Random(5))
    assert schedule.due(range(100), 0.0) == []  # first sight: each waits a random part of an interval
    tested_at: dict[int, list[float]] = {}
    for t in range(0, 400):
        for k in schedule.due(range(100), float(t)):
            tested_at.setdefault(k, []).append(float(t))
    firsts = [times[0] for times in tested_at.values()]
    assert len(firsts) == 100 and max(firsts) <= 60.0  # each within the first interval...
    assert len(set(firsts)) > 30  # ...spread out, not all at once
    for times in tested_at.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps and all(47.0 <= gap <= 73.0 for gap in gaps)  # 60 s +-20 %, to the one-second tick
    assert schedule.due([1], 1000.0) in ([], [1])
    assert schedule.due([], 1000.0) == []
    assert schedule.due([2], 1000.0) == []  # forgotten meanwhile: a first sight again
