"""The Redis backend on the real server at 127.0.0.1:6379: exactness, atomicity across instances, outages.

Every test works under a key prefix of its own and deletes its keys afterwards. The shared Redis server is never
stopped: an outage is a backend pointed at a closed port, or a TCP relay in front of Redis that the test closes
mid-run (and reopens on the same port to see the recovery).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import Decimal
from typing import Any

import coredis
import pytest
import sqlalchemy as sa
import trio
import trio.lowlevel

from tests.examples import examples
from tests.redis_support import Relay, delete_prefix
from tests.unit.test_limits_admission import admit_all
from tests.unit.test_limits_local import (
    BASE_DAY,
    check_against_reference,
    gateway_key,
    provider_key,
)
from trioproxy.limits import (
    Admission,
    AdmissionRequest,
    Admitted,
    FailurePolicy,
    LimitsSettings,
    RefusalKind,
    Refused,
    Scope,
    no_spend,
    open_admission,
)
from trioproxy.limits.model import DAY, Check, NeedsSeed, Plan, Reservation, build_plan, reservation_for
from trioproxy.limits.redis_backend import RedisBackend
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.snapshot import ProviderKind
from trioproxy.store.db import create_engine_for, run_migrations
from trioproxy.store.request_log import insert_request_records
from trioproxy.store.spend import database_spend

pytestmark = pytest.mark.redis

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
NOW = BASE_DAY + 3600.0


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


def settings_for(url: str, prefix: str, **kwargs: Any) -> LimitsSettings:
    # A generous deadline: these tests are about atomicity and outages, and a timeout on a test host busy with
    # other suites would count as an outage (fail open, per instance) and make them flaky.
    kwargs.setdefault("redis_timeout", 5.0)
    return LimitsSettings(redis_url=url, redis_prefix=prefix, **kwargs)


# --- the reference model ------------------------------------------------------------------------------------


class RedisAdapter:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    async def reserve(self, plan: Plan) -> Any:
        return await self.backend.reserve(plan)

    async def settle(self, reservation: Reservation, tokens: int, cost: int) -> None:
        await self.backend.settle(reservation, tokens, cost)

    async def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None:
        await self.backend.seed(items, now)


def test_redis_backend_matches_the_reference_model(redis_url: str) -> None:
    @contextlib.asynccontextmanager
    async def backend() -> AsyncIterator[RedisAdapter]:
        name = f"tp-test-{secrets.token_hex(6)}"
        try:
            async with RedisBackend.open(redis_url, name) as redis:
                yield RedisAdapter(redis)
        finally:
            await delete_prefix(redis_url, name)

    tally = check_against_reference("redis", backend, trio.run, max_examples=examples(40))
    assert tally.admitted > 0


# --- concurrency across instances ---------------------------------------------------------------------------


async def test_200_concurrent_admissions_against_rpm_50_across_two_instances(
    redis_url: str, prefix: str
) -> None:
    key = gateway_key(rpm_limit=50)
    settings = settings_for(redis_url, prefix)
    async with open_admission(settings, no_spend) as one, open_admission(settings, no_spend) as two:
        requests = [AdmissionRequest(f"r{i}", key, NOW) for i in range(200)]
        results: list[Admitted | Refused] = []

        async def run(admission: Admission, part: list[AdmissionRequest]) -> None:
            results.extend(await admit_all(admission, part))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, one, requests[::2])
            nursery.start_soon(run, two, requests[1::2])
        assert one.backend_name == two.backend_name == "redis"
    assert sum(isinstance(r, Admitted) for r in results) == 50
    assert {r.kind for r in results if isinstance(r, Refused)} == {RefusalKind.RATE}


async def test_budget_under_100_way_concurrency_across_two_instances(redis_url: str, prefix: str) -> None:
    """$1.00 budget, requests of up to $0.01, 100 clients on two instances: the spend ends <= $1.01."""
    key = gateway_key(budget=Decimal("1.00"), budget_period="daily")
    settings = settings_for(redis_url, prefix)
    spent = Decimal(0)
    counter = 0
    async with open_admission(settings, no_spend) as one, open_admission(settings, no_spend) as two:

        async def client(n: int, admission: Admission) -> None:
            nonlocal spent, counter
            while True:
                counter += 1
                verdict = await admission.admit(
                    AdmissionRequest(f"c{counter}", key, NOW, estimated_cost=Decimal("0.01"))
                )
                if isinstance(verdict, Refused):
                    assert verdict.kind is RefusalKind.BUDGET
                    assert verdict.status_for(ProviderKind.ANTHROPIC) == 402
                    if verdict.retry_after == 1:  # only reservations in flight stand in the way
                        await trio.sleep(0.002)
                        continue
                    return
                await trio.sleep(0.001 * (n % 7))
                actual = Decimal(1 + (counter * 7919) % 100).scaleb(-4)  # $0.0001 .. $0.01
                spent += actual
                admission.settle(verdict.reservation, 100, actual)

        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(client, n, one if n % 2 else two)
        await one.drain()
        await two.drain()
        state = await one.limit_state(key, NOW)
    assert Decimal("0.99") < spent <= Decimal("1.01")
    assert Decimal(state["limits"][0]["used"]) == spent  # every settlement reached Redis exactly once


# --- outages --------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("policy", list(FailurePolicy))
async def test_unreachable_redis_applies_the_policy(
    policy: FailurePolicy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioproxy.limits.admission")
    settings = settings_for(
        f"redis://127.0.0.1:{closed_port()}/0", "unused", on_redis_failure=policy, instances=2
    )
    async with open_admission(settings, no_spend) as admission:
        key = gateway_key(rpm_limit=10, budget=Decimal(5))
        results = await admit_all(
            admission,
            [AdmissionRequest(f"r{i}", key, NOW, estimated_cost=Decimal("0.01")) for i in range(30)],
        )
        free = await admission.admit(AdmissionRequest("free", gateway_key(2), NOW))
        assert isinstance(free, Admitted)  # no limits: Redis is not involved
        for result in results:
            if isinstance(result, Admitted):
                admission.settle(result.reservation, 1, Decimal("0.01"))
        assert admission.backend_name == ("fallback" if policy is FailurePolicy.FAIL_OPEN_LOCAL else "none")
    admitted = [r for r in results if isinstance(r, Admitted)]
    refused = [r for r in results if isinstance(r, Refused)]
    if policy is FailurePolicy.FAIL_OPEN_LOCAL:
        assert len(admitted) == 5  # RPM 10 shared by 2 instances
        assert {r.kind for r in refused} == {RefusalKind.RATE}
    else:
        assert admitted == []
        assert {(r.kind, r.status_for(ProviderKind.OPENAI), r.retry_after) for r in refused} == {
            (RefusalKind.UNAVAILABLE, 503, 1)
        }
    outage_lines = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(outage_lines) == 1
    assert policy.value in outage_lines[0].getMessage()


async def test_redis_lost_mid_run_then_back(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trioproxy.limits.admission")
    key = gateway_key(rpm_limit=20, tpm_limit=10_000)
    async with trio.open_nursery() as nursery:
        relay = Relay()
        await relay.start(nursery)
        settings = settings_for(
            f"redis://127.0.0.1:{relay.port}/0", prefix, instances=2, redis_retry_interval=0.2
        )
        async with open_admission(settings, no_spend) as admission:

            async def burst(tag: str, count: int, now: float) -> list[Admitted | Refused]:
                requests = [
                    AdmissionRequest(f"{tag}{i}", key, now, estimated_tokens=100) for i in range(count)
                ]
                return await admit_all(admission, requests)

            before = [r for r in await burst("a", 4, NOW) if isinstance(r, Admitted)]
            assert len(before) == 4
            assert admission.backend_name == "redis"

            relay.cut()
            during = await burst("b", 30, NOW + 1)
            admitted_during = [r for r in during if isinstance(r, Admitted)]
            assert len(admitted_during) == 10  # fail_open_local: RPM 20 / 2 instances
            assert admission.backend_name == "fallback"
            for verdict in (
                before + admitted_during
            ):  # settlements during the outage never wait and never fail
                admission.settle(verdict.reservation, 50, None)

            await relay.start(nursery)  # Redis is back on the same port
            await trio.sleep(settings.redis_retry_interval * 1.5)
            after = await burst("c", 30, NOW + 2)
            assert admission.backend_name == "redis"
            with trio.fail_after(5):
                await admission.drain()
            state = await admission.limit_state(key, NOW + 2)
        relay.cut()
    # Redis still knew the 4 of before: 16 more fit its RPM of 20.
    assert sum(isinstance(r, Admitted) for r in after) == 16
    tpm = next(entry for entry in state["limits"] if entry["name"] == "tpm")
    assert tpm["used"] == 4 * 50 + 16 * 100  # the settled "before" requests, and the open "after" ones
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unreachable" in m for m in messages) == 1
    assert sum("Redis reachable again" in m for m in messages) == 1


# --- leases, idempotency, seeds -------------------------------------------------------------------------------


def plan_for(key: Any, now: float, rid: str, **kwargs: Any) -> Plan:
    plan = build_plan(AdmissionRequest(rid, key, now, **kwargs))
    assert isinstance(plan, Plan)
    return plan


async def reserve(backend: RedisBackend, plan: Plan, seed: int = 0) -> bool:
    answer = await backend.reserve(plan)
    if isinstance(answer, NeedsSeed):
        await backend.seed([(plan.checks[i], seed) for i in answer.indices], plan.now)
        answer = await backend.reserve(plan)
    assert not isinstance(answer, NeedsSeed)
    return all(result.ok for result in answer)


async def test_leases_expire_in_redis(redis_url: str, prefix: str) -> None:
    async with RedisBackend.open(redis_url, prefix) as backend:
        gauge = gateway_key(max_concurrency=1)
        assert await reserve(backend, plan_for(gauge, NOW, "a", lease_seconds=10))
        assert not await reserve(backend, plan_for(gauge, NOW + 9.9, "b"))
        assert await reserve(backend, plan_for(gauge, NOW + 10, "c", lease_seconds=10))

        budget = gateway_key(2, budget=Decimal("0.000000100"))  # 100 nano-dollars
        first = plan_for(budget, NOW, "x", estimated_cost=Decimal("0.000000080"), lease_seconds=30)
        assert await reserve(backend, first)
        assert not await reserve(
            backend, plan_for(budget, NOW + 1, "y", estimated_cost=Decimal("0.00000003"))
        )
        # x's process died: at the end of its lease the 80 come back.
        late = plan_for(budget, NOW + 30, "z", estimated_cost=Decimal("0.00000003"), lease_seconds=1)
        assert await reserve(backend, late)
        assert await backend.used([first.checks[0]], NOW + 30) == [30]
        assert await backend.settle(reservation_for(first, "redis"), 0, 50)  # late, but the usage counts
        assert await backend.used([first.checks[0]], NOW + 31) == [50]  # and z's lease ended unsettled


async def test_settlement_is_idempotent(redis_url: str, prefix: str) -> None:
    async with RedisBackend.open(redis_url, prefix) as backend:
        key = gateway_key(tpm_limit=1000, daily_token_limit=1000, max_concurrency=1)
        plan = plan_for(key, NOW, "a", estimated_tokens=300)
        assert await reserve(backend, plan)
        reservation = reservation_for(plan, "redis")
        assert await backend.settle(reservation, 120, 0)
        assert not await backend.settle(reservation, 120, 0)  # a retried settle after a lost reply
        assert await backend.used(list(plan.checks), NOW + 1) == [120, 120, 0]


async def test_seeding_never_overwrites(redis_url: str, prefix: str) -> None:
    async with RedisBackend.open(redis_url, prefix) as backend:
        key = gateway_key(rpd_limit=10)
        plan = plan_for(key, NOW, "a")
        check = plan.checks[0]
        assert isinstance(await backend.reserve(plan), NeedsSeed)
        await backend.seed([(check, 7)], NOW)
        await backend.seed([(check, 0)], NOW)  # another instance, later: the first value stays
        assert await backend.used([check], NOW) == [7]
        async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
            ttl = await client.ttl(f"{prefix}:{check.key}")
        assert DAY - 3600 < ttl <= DAY - 3600 + 120  # until the end of the day, plus a grace


async def test_provider_key_hint_with_redis(redis_url: str, prefix: str) -> None:
    async with open_admission(settings_for(redis_url, prefix), no_spend) as admission:
        key = gateway_key(rpm_limit=100)
        pk = provider_key(5, rpm_limit=1)
        assert isinstance(await admission.admit(AdmissionRequest("a", key, NOW, provider_key=pk)), Admitted)
        assert admission.provider_key_admissible(5, NOW)  # a hint from refusals only
        refused = await admission.admit(AdmissionRequest("b", key, NOW + 1, provider_key=pk))
        assert isinstance(refused, Refused)
        assert refused.scope is Scope.PROVIDER_KEY
        assert not admission.provider_key_admissible(5, NOW + 2)
        assert admission.provider_key_admissible(5, NOW + 60)


# --- spend so far from the database ----------------------------------------------------------------------------


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[sa.Engine]:
    run_migrations(sqlite_url)
    engine = create_engine_for(sqlite_url)
    try:
        yield engine
    finally:
        engine.dispose()


def record(rid: str, started_at: float, cost: str, **fields: Any) -> RequestRecord:
    return RequestRecord(
        request_id=rid,
        started_at=started_at,
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip=None,
        gateway_key_id=1,
        status=200,
        usage=Usage(input_tokens=10, output_tokens=5),
        cost=CostBreakdown(Decimal(cost), Decimal(0), Decimal(0), Decimal(0)),
        **fields,
    )


async def test_redis_counters_are_seeded_from_the_database(
    redis_url: str, prefix: str, engine: sa.Engine
) -> None:
    insert_request_records(
        engine,
        [
            record("r1", NOW - 10, "0.40"),
            record("r2", NOW - 20, "0.50"),
            record("r3", NOW - DAY, "5.00"),  # yesterday: not today's spend
            record("r4", NOW - 5, "9.00", outcome=Outcome.REJECTED),  # refused by the gateway: not spent
        ],
    )
    key = gateway_key(daily_cost_limit=Decimal("1.00"), rpd_limit=4)
    spend = functools.partial(database_spend, engine)
    async with open_admission(settings_for(redis_url, prefix), spend) as admission:

        async def ask(rid: str, cost: str) -> Admitted | Refused:
            return await admission.admit(AdmissionRequest(rid, key, NOW, estimated_cost=Decimal(cost)))

        assert isinstance(await ask("a", "0.05"), Admitted)  # $0.90 and 2 requests today before it
        refused = await ask("b", "0.10")
        assert isinstance(refused, Refused)
        assert refused.limit_name == "daily_cost"  # 0.90 + 0.05 reserved + 0.10 > 1.00
        # Redis loses its data: the next decision seeds the counters again from the database.
        await delete_prefix(redis_url, prefix)
        assert isinstance(await ask("c", "0.05"), Admitted)
        assert isinstance(await ask("d", "0.01"), Admitted)
        refused = await ask("e", "0.01")
        assert isinstance(refused, Refused)
        assert refused.limit_name == "rpd"  # 2 rows today + c + d: 4 of 4


async def test_a_caller_cancelled_during_the_decision_still_gets_its_reservation(
    redis_url: str, prefix: str
) -> None:
    """The Redis call is shielded (and bounded): a reservation made there is never orphaned by a client that
    hung up meanwhile; the caller gets it back and releases it."""
    key = gateway_key(rpm_limit=5, max_concurrency=1)
    async with open_admission(settings_for(redis_url, prefix), no_spend) as admission:
        with trio.CancelScope() as scope:
            scope.cancel()
            verdict = await admission.admit(AdmissionRequest("a", key, NOW))
            assert isinstance(verdict, Admitted)
            admission.release(verdict.reservation)
            await trio.lowlevel.checkpoint()  # the cancellation arrives at the next checkpoint
            pytest.fail("not cancelled")  # pragma: no cover
        assert scope.cancelled_caught
        await admission.drain()
        state = await admission.limit_state(key, NOW)
    assert [(e["name"], e["used"]) for e in state["limits"]] == [("rpm", 1), ("concurrency", 0)]


async def test_a_corrupted_key_fails_only_its_own_requests(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answering with an error is not an outage: other keys keep their shared limits."""
    async with open_admission(
        settings_for(redis_url, prefix, on_redis_failure=FailurePolicy.FAIL_CLOSED), no_spend
    ) as admission:
        async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
            await client.hset(f"{prefix}:gk:1:rpm", {"not": "a sorted set"})
        broken = await admission.admit(AdmissionRequest("a", gateway_key(1, rpm_limit=5), NOW))
        assert isinstance(broken, Refused)
        assert broken.kind is RefusalKind.UNAVAILABLE
        assert admission.backend_name == "redis"
        assert isinstance(
            await admission.admit(AdmissionRequest("b", gateway_key(2, rpm_limit=5), NOW)), Admitted
        )
    assert any("Redis rejected a decision" in r.getMessage() for r in caplog.records)
