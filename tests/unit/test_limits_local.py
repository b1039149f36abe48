"""The in-process limiter against an exact reference model, plus its lease, divisor and purge behaviour.

The reference (:class:`Reference`) is deliberately naive: it keeps every reservation ever made and recomputes
each counter from scratch at every decision (a window sums the entries with ``now - t < 60``; a counter sums
seed + settled actuals + open reservations whose lease has not ended; a gauge counts live leases). Hypothesis
drives random scenarios (arrival gaps including exact 60 s boundaries, midnight crossings, random settles,
releases and abandoned reservations) through a backend and the reference; every decision and every ``used``
figure must agree. The same driver runs against Redis in ``tests/integration/test_limits_redis.py``.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.limits.local import LocalBackend
from trioproxy.limits.model import (
    DAY,
    RATE_WINDOW,
    AdmissionRequest,
    Answer,
    Check,
    CheckKind,
    NeedsSeed,
    Plan,
    Reservation,
    build_plan,
    reservation_for,
    settled_amount,
)
from trioproxy.snapshot import GatewayKeyView, ProviderKeyView, UserLimitsView

BASE_DAY = 20_000 * DAY  # 2024-10-04, a Friday (Redis TTLs are computed relative to the scenario's times)


def usd(nano: int) -> Decimal:
    return Decimal(nano).scaleb(-9)


def gateway_key(key_id: int = 1, **limits: Any) -> GatewayKeyView:
    return GatewayKeyView(
        id=key_id,
        name="k",
        owner_id=None,
        provider_id=1,
        prefix="tp-x",
        pool=(),
        strategy="round_robin",
        retry_count=0,
        allowed_models=None,
        expires_at=None,
        enabled=True,
        **limits,
    )


def provider_key(key_id: int = 1, **limits: Any) -> ProviderKeyView:
    return ProviderKeyView(
        id=key_id, name="p", provider_id=1, owner_id=None, secret="sk-x", weight=1, enabled=True, **limits
    )


# --- the reference model ------------------------------------------------------------------------------------


@dataclass
class Entry:
    rid: str
    t: float
    amount: int
    lease_until: float
    settles: bool
    actual: int | None = None
    done: bool = False  # gauge: lease returned


class Reference:
    def __init__(self) -> None:
        self.entries: dict[str, list[Entry]] = defaultdict(list)
        self.seeds: dict[str, int] = {}

    def used(self, check: Check, now: float) -> int:
        entries = self.entries[check.key]
        if check.kind is CheckKind.WINDOW:
            return sum(
                e.amount if e.actual is None else e.actual for e in entries if not e.t <= now - RATE_WINDOW
            )
        if check.kind is CheckKind.COUNTER:
            total = self.seeds[check.key]
            for e in entries:
                if not e.settles:
                    total += e.amount
                elif e.actual is not None:
                    total += e.actual
                elif e.lease_until > now:
                    total += e.amount
            return total
        return sum(1 for e in entries if not e.done and e.lease_until > now)

    def evaluate(self, plan: Plan) -> list[tuple[bool, int]]:
        out = []
        for check in plan.checks:
            used = self.used(check, plan.now)
            out.append((used + check.amount <= check.limit, used))
        return out

    def apply(self, plan: Plan) -> None:
        for check in plan.checks:
            self.entries[check.key].append(
                Entry(plan.rid, plan.now, check.amount, plan.lease_until, check.settles)
            )

    def settle(self, reservation: Reservation, tokens: int, cost: int) -> None:
        for check in reservation.checks:
            for e in self.entries[check.key]:
                if e.rid != reservation.rid:
                    continue
                if check.kind is CheckKind.GAUGE:
                    e.done = True
                else:
                    e.actual = settled_amount(check, tokens, cost)


# --- scenarios ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    gap: float
    tokens: int
    cost: int
    lease: float


@dataclass(frozen=True)
class Settle:
    pick: int
    tokens: int
    cost: int
    release: bool


@dataclass(frozen=True)
class Scenario:
    start: float  # offset from the anchor day
    salt: int
    key: GatewayKeyView
    user: UserLimitsView | None
    pkey: ProviderKeyView | None
    ops: tuple[Admit | Settle, ...]


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Mostly unset, so a scenario has a few limits and a fair share of its requests pass them all.
    return st.one_of(st.none(), st.none(), strategy)


gaps = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 29.5, 59.999, 60.0, 60.001, 120.0]),
    st.floats(0, 90, allow_nan=False, allow_infinity=False),
)
periods = st.sampled_from([None, "daily", "weekly", "monthly", "bogus"])


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    key = gateway_key(
        rpm_limit=draw(_maybe(st.integers(0, 8))),
        tpm_limit=draw(_maybe(st.integers(0, 1500))),
        rpd_limit=draw(_maybe(st.integers(0, 25))),
        daily_token_limit=draw(_maybe(st.integers(0, 4000))),
        daily_cost_limit=draw(_maybe(st.integers(0, 12000).map(usd))),
        budget=draw(_maybe(st.integers(0, 20000).map(usd))),
        budget_period=draw(periods),
        max_concurrency=draw(_maybe(st.integers(0, 6))),
    )
    user_budget = draw(_maybe(st.integers(0, 9000)))
    user = None if user_budget is None else UserLimitsView(7, usd(user_budget), draw(periods))
    pkey = draw(
        _maybe(
            st.builds(
                provider_key,
                rpm_limit=_maybe(st.integers(0, 5)),
                tpm_limit=_maybe(st.integers(0, 800)),
                rpd_limit=_maybe(st.integers(0, 12)),
            )
        )
    )
    admit = st.builds(
        Admit,
        gap=gaps,
        tokens=st.integers(0, 300),
        cost=st.integers(0, 1500),
        lease=st.sampled_from([5.0, 60.0, 200.0, 660.0]),
    )
    settle = st.builds(
        Settle,
        pick=st.integers(0, 50),
        tokens=st.integers(0, 400),
        cost=st.integers(0, 2000),
        release=st.booleans(),
    )
    ops = draw(st.lists(st.one_of(admit, admit, settle), min_size=20, max_size=80))
    # Start mid-day, or shortly before midnight (counters roll over), or before a Monday / a month's 1st.
    start = draw(st.sampled_from([3_600.0, DAY - 300.0, 3 * DAY - 200.0, 28 * DAY - 100.0]))
    return Scenario(start, draw(st.integers(0, 10_000)), key, user, pkey, tuple(ops))


class Backend(Protocol):
    async def reserve(self, plan: Plan) -> Answer: ...
    async def settle(self, reservation: Reservation, tokens: int, cost: int) -> Any: ...
    async def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None: ...


class LocalAdapter:
    def __init__(self) -> None:
        self.backend = LocalBackend()

    async def reserve(self, plan: Plan) -> Answer:
        return self.backend.reserve(plan)

    async def settle(self, reservation: Reservation, tokens: int, cost: int) -> None:
        self.backend.settle(reservation, tokens, cost)

    async def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None:
        for check, value in items:
            self.backend.seed(check, value)


@dataclass
class Tally:
    decisions: int = 0
    wrong: int = 0
    admitted: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.wrong / self.decisions if self.decisions else 0.0

    def report(self, name: str) -> str:
        return (
            f"{name}: {self.wrong} wrong decisions of {self.decisions} ({self.rate:.4%}), "
            f"{self.admitted} admitted"
        )


def seed_value(check: Check, salt: int) -> int:
    """Spend 'in the database' before the scenario: mostly under half the limit, now and then all of it."""
    draw = zlib.crc32(f"{check.key}/{salt}".encode())
    return check.limit + draw % 3 if draw % 10 == 0 else draw % (check.limit // 2 + 1)


async def run_scenario(backend: Backend, scenario: Scenario, anchor: float, tally: Tally) -> None:
    reference = Reference()
    now = anchor + scenario.start
    open_reservations: list[Reservation] = []
    for index, op in enumerate(scenario.ops):
        if isinstance(op, Settle):
            if not open_reservations:
                continue
            reservation = open_reservations.pop(op.pick % len(open_reservations))
            tokens, cost = (0, 0) if op.release else (op.tokens, op.cost)
            await backend.settle(reservation, tokens, cost)
            reference.settle(reservation, tokens, cost)
            continue
        now += op.gap
        request = AdmissionRequest(
            request_id=f"r{index}",
            gateway_key=scenario.key,
            now=now,
            estimated_tokens=op.tokens,
            estimated_cost=usd(op.cost),
            user=scenario.user,
            provider_key=scenario.pkey,
            lease_seconds=op.lease,
        )
        plan = build_plan(request)
        assert isinstance(plan, Plan)
        answer = await backend.reserve(plan)
        if isinstance(answer, NeedsSeed):
            items = [(plan.checks[i], seed_value(plan.checks[i], scenario.salt)) for i in answer.indices]
            for check, value in items:
                assert check.key not in reference.seeds, f"{check.key} was seeded before"
                reference.seeds[check.key] = value
            await backend.seed(items, now)
            answer = await backend.reserve(plan)
            assert not isinstance(answer, NeedsSeed)
        expected = reference.evaluate(plan)
        got = [(result.ok, result.used) for result in answer]
        tally.decisions += 1
        if got != expected:
            tally.wrong += 1
            if len(tally.examples) < 3:
                tally.examples.append(f"op {index} at {now}: {plan.checks} got {got} expected {expected}")
        if all(ok for ok, _ in got):
            tally.admitted += 1
            reference.apply(plan)
            reservation = reservation_for(plan, "test")
            if reservation.checks:
                open_reservations.append(reservation)


def check_against_reference(
    name: str,
    make_backend: Callable[[], Any],
    run: Callable[[Callable[[], Awaitable[None]]], None],
    max_examples: int | None = None,
) -> Tally:
    """Run many scenarios; every example must agree with the reference (the tally reports the rate)."""
    tally = Tally()

    @settings(max_examples=max_examples) if max_examples else (lambda f: f)
    @given(scenarios())
    def example(scenario: Scenario) -> None:
        wrong_before = tally.wrong

        async def body() -> None:
            async with make_backend() as backend:
                await run_scenario(backend, scenario, BASE_DAY, tally)

        run(body)
        assert tally.wrong == wrong_before, tally.report(name) + "\n" + "\n".join(tally.examples)

    example()
    print(tally.report(name))
    assert tally.decisions > 0
    assert tally.rate == 0.0, tally.report(name)
    return tally


class _LocalContext:
    async def __aenter__(self) -> LocalAdapter:
        return LocalAdapter()

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_local_backend_matches_the_reference_model() -> None:
    # A fixed number of examples (about 2,000 decisions), also in CI: the scenarios are long already.
    tally = check_against_reference("local", _LocalContext, trio.run, max_examples=examples(100))
    assert tally.admitted > 0


# --- targeted behaviour ---------------------------------------------------------------------------------------


def plan_for(key: GatewayKeyView, now: float, rid: str, **kwargs: Any) -> Plan:
    plan = build_plan(AdmissionRequest(rid, key, now, **kwargs))
    assert isinstance(plan, Plan)
    return plan


def reserve_seeded(backend: LocalBackend, plan: Plan, seed: int = 0) -> Answer:
    answer = backend.reserve(plan)
    if isinstance(answer, NeedsSeed):
        for i in answer.indices:
            backend.seed(plan.checks[i], seed)
        answer = backend.reserve(plan)
    return answer


def admitted(answer: Answer) -> bool:
    assert not isinstance(answer, NeedsSeed)
    return all(result.ok for result in answer)


def test_window_boundary_is_exactly_sixty_seconds() -> None:
    backend = LocalBackend()
    key = gateway_key(rpm_limit=1)
    assert admitted(reserve_seeded(backend, plan_for(key, 100.0, "a")))
    assert not admitted(reserve_seeded(backend, plan_for(key, 159.999, "b")))
    assert admitted(reserve_seeded(backend, plan_for(key, 160.0, "c")))


def test_window_retry_in_points_at_the_entry_whose_expiry_makes_room() -> None:
    backend = LocalBackend()
    key = gateway_key(tpm_limit=100)
    assert admitted(reserve_seeded(backend, plan_for(key, 0.0, "a", estimated_tokens=60)))
    assert admitted(reserve_seeded(backend, plan_for(key, 10.0, "b", estimated_tokens=40)))
    answer = reserve_seeded(backend, plan_for(key, 20.0, "c", estimated_tokens=50))
    assert not isinstance(answer, NeedsSeed)
    assert answer[0].retry_in == 40.0  # "a" expires at 60, then 40 + 50 fit
    too_big = reserve_seeded(backend, plan_for(key, 20.0, "d", estimated_tokens=101))
    assert not isinstance(too_big, NeedsSeed)
    assert too_big[0].retry_in is None


def test_counter_lease_expiry_gives_the_reservation_back_and_late_settle_counts_in_full() -> None:
    backend = LocalBackend()
    key = gateway_key(daily_token_limit=100)
    first = plan_for(key, 1000.0, "a", estimated_tokens=80, lease_seconds=30.0)
    assert admitted(reserve_seeded(backend, first))
    assert not admitted(reserve_seeded(backend, plan_for(key, 1010.0, "b", estimated_tokens=30)))
    # "a" never settles in time (its process died): its lease ends at 1030 and the estimate comes back.
    assert admitted(reserve_seeded(backend, plan_for(key, 1030.0, "c", estimated_tokens=30, lease_seconds=1)))
    check = first.checks[0]
    assert backend.used(check, 1030.0) == 30
    backend.settle(reservation_for(first, "local"), 50, 0)  # a late settle still counts what was used
    assert backend.used(check, 1030.0) == 80


def test_gauge_leases_expire() -> None:
    backend = LocalBackend()
    key = gateway_key(max_concurrency=1)
    first = plan_for(key, 0.0, "a", lease_seconds=10.0)
    assert admitted(reserve_seeded(backend, first))
    assert not admitted(reserve_seeded(backend, plan_for(key, 9.99, "b")))
    assert admitted(reserve_seeded(backend, plan_for(key, 10.0, "c", lease_seconds=10.0)))
    backend.settle(reservation_for(first, "local"), 0, 0)  # ending an expired lease changes nothing
    assert not admitted(reserve_seeded(backend, plan_for(key, 11.0, "d")))


@given(instances=st.integers(1, 5), limit=st.integers(0, 50), spent=st.integers(0, 60))
def test_divided_limits_sum_to_at_most_the_limit(instances: int, limit: int, spent: int) -> None:
    """N stand-ins with the divisor N admit at most the limit together (at most what is left of a counter)."""
    for name, allowed in (
        ("rpm_limit", limit),
        ("max_concurrency", limit),
        ("rpd_limit", max(0, limit - spent)),
    ):
        key = gateway_key(**{name: limit})
        total = 0
        for _ in range(instances):
            backend = LocalBackend(divisor=instances)
            total += sum(
                admitted(reserve_seeded(backend, plan_for(key, 5.0, f"r{i}"), seed=spent))
                for i in range(limit + 1)
            )
        assert total <= allowed, name
        if instances == 1:
            assert total == allowed, name


def test_old_periods_are_purged() -> None:
    backend = LocalBackend()
    key = gateway_key(rpd_limit=5, rpm_limit=5)
    assert admitted(reserve_seeded(backend, plan_for(key, 100.0, "a")))
    assert list(backend._counters) == ["gk:1:rpd:d0"]
    assert admitted(reserve_seeded(backend, plan_for(key, DAY + 3600.0, "b")))
    assert list(backend._counters) == ["gk:1:rpd:d1"]
    assert len(backend._windows) == 1
    assert backend.used(plan_for(key, DAY + 3600.0, "c").checks[0], DAY + 3600.0) == 1


def test_settle_is_idempotent_for_windows() -> None:
    backend = LocalBackend()
    key = gateway_key(tpm_limit=100)
    plan = plan_for(key, 0.0, "a", estimated_tokens=70)
    assert admitted(reserve_seeded(backend, plan))
    reservation = reservation_for(plan, "local")
    backend.settle(reservation, 20, 0)
    backend.settle(reservation, 20, 0)
    assert backend.used(plan.checks[0], 1.0) == 20
