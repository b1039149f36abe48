"""The admission facade on the in-process backend: concurrency, seeding, settlement and the read views.

Request times are a fake wall clock (``BASE + trio.current_time()``) so the autojump clock moves both.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from decimal import Decimal

import pytest
import trio
import trio.testing

from tests.unit.test_limits_local import gateway_key, provider_key
from trioproxy.limits import (
    Admission,
    AdmissionRequest,
    Admitted,
    LimitsSettings,
    RefusalKind,
    Refused,
    Scope,
    SpendQuery,
    no_spend,
    open_admission,
)
from trioproxy.limits.model import DAY, Measure
from trioproxy.snapshot import GatewayKeyView, ProviderKind, UserLimitsView

BASE = 20_000 * DAY + 3600.0
# trio's clock starts at an arbitrary value: remember it per run, so now() starts at BASE.
_ZERO: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("limits_test_zero")


def now() -> float:
    try:
        zero = _ZERO.get()
    except LookupError:
        zero = trio.current_time()
        _ZERO.set(zero)
    return BASE + trio.current_time() - zero


def ask(key: GatewayKeyView, rid: str, **kwargs: object) -> AdmissionRequest:
    return AdmissionRequest(rid, key, now(), **kwargs)  # type: ignore[arg-type]


async def admit_all(admission: Admission, requests: Sequence[AdmissionRequest]) -> list[Admitted | Refused]:
    results: list[Admitted | Refused] = []

    async def one(request: AdmissionRequest) -> None:
        results.append(await admission.admit(request))

    async with trio.open_nursery() as nursery:
        for request in requests:
            nursery.start_soon(one, request)
    return results


async def test_200_concurrent_admissions_against_rpm_50_admit_exactly_50() -> None:
    async with open_admission(LimitsSettings(), no_spend) as admission:
        key = gateway_key(rpm_limit=50)
        at = now()
        results = await admit_all(admission, [AdmissionRequest(f"r{i}", key, at) for i in range(200)])
    admitted = [r for r in results if isinstance(r, Admitted)]
    refused = [r for r in results if isinstance(r, Refused)]
    assert len(admitted) == 50
    assert {(r.kind, r.retry_after) for r in refused} == {(RefusalKind.RATE, 60)}


async def test_budget_under_100_way_concurrency(autojump_clock: trio.testing.MockClock) -> None:
    """$1.00, requests estimated at up to $0.01 (their max_tokens bound) that cost up to that: spend <= $1.01."""
    rng = random.Random(7)
    spent = Decimal(0)
    budget_refusals = 0
    async with open_admission(LimitsSettings(), no_spend) as admission:
        key = gateway_key(budget=Decimal("1.00"), budget_period="monthly")

        async def client(n: int) -> None:
            nonlocal spent, budget_refusals
            for i in range(1000):
                estimate = Decimal(rng.randint(1, 10_000)).scaleb(-6)  # up to $0.01
                verdict = await admission.admit(ask(key, f"c{n}-{i}", estimated_cost=estimate))
                if isinstance(verdict, Refused):
                    assert verdict.kind is RefusalKind.BUDGET
                    budget_refusals += 1
                    if estimate <= Decimal("0.0001"):
                        return
                    continue
                await trio.sleep(rng.random())  # the request runs
                actual = estimate * Decimal(rng.randint(0, 100)) / 100
                spent += actual
                if rng.random() < 0.1:
                    admission.release(verdict.reservation)  # failed before any usage
                    spent -= actual
                else:
                    admission.settle(verdict.reservation, 10, actual)

        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(client, n)
        state = await admission.limit_state(key, now())
    assert spent <= Decimal("1.01")
    assert spent > Decimal("0.95")  # the budget was actually used, not refused early
    assert budget_refusals > 0
    # The counter holds each cost rounded up to a nano-dollar: within a few thousand nano-dollars of exact.
    assert Decimal(0) <= Decimal("1.00") - spent - Decimal(state["budget_left_usd"]) < Decimal("1e-5")


class Ledger:
    """A spend source with database-like sums, counting its calls (it runs in a worker thread)."""

    def __init__(self, values: dict[tuple[Scope, int, Measure], int], fail: bool = False) -> None:
        self.values = values
        self.fail = fail
        self.calls: list[list[SpendQuery]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, queries: Sequence[SpendQuery]) -> list[int]:
        self.calls.append(list(queries))
        self.release.wait(10)
        if self.fail:
            raise OSError("database down")
        return [self.values.get((q.scope, q.subject_id, q.measure), 0) for q in queries]


async def test_counters_start_from_the_spend_so_far_once_for_concurrent_requests() -> None:
    ledger = Ledger({(Scope.GATEWAY_KEY, 1, Measure.REQUESTS): 8, (Scope.USER, 5, Measure.COST): 999_000_000})
    ledger.release.clear()
    async with open_admission(LimitsSettings(), ledger) as admission:
        key = gateway_key(rpd_limit=10)
        user = UserLimitsView(5, Decimal("1.00"))
        requests = [ask(key, f"r{i}", user=user, estimated_cost=Decimal("0.0005")) for i in range(20)]
        async with trio.open_nursery() as nursery:
            results: list[Admitted | Refused] = []

            async def run() -> None:
                results.extend(await admit_all(admission, requests))

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            ledger.release.set()
    assert len(ledger.calls) == 1  # one query for both counters, shared by the 20 admissions
    assert {(q.scope, q.measure) for q in ledger.calls[0]} == {
        (Scope.GATEWAY_KEY, Measure.REQUESTS),
        (Scope.USER, Measure.COST),
    }
    assert all(q.since == BASE - 3600.0 for q in ledger.calls[0] if q.scope is Scope.GATEWAY_KEY)
    admitted = [r for r in results if isinstance(r, Admitted)]
    # 8 requests today already: 2 more fit the RPD; the user's $0.999 of $1.00 fits 2 more at $0.0005.
    assert len(admitted) == 2


async def test_a_spend_that_cannot_be_read_refuses_with_503() -> None:
    async with open_admission(LimitsSettings(), Ledger({}, fail=True)) as admission:
        verdict = await admission.admit(
            ask(gateway_key(budget=Decimal("5")), "r1", estimated_cost=Decimal("0.1"))
        )
        assert isinstance(verdict, Refused)
        assert verdict.kind is RefusalKind.UNAVAILABLE
        assert verdict.status_for(ProviderKind.OPENAI) == 503
        assert dict(verdict.headers)[b"retry-after"] == b"1"
        # Keys without counters to seed are not affected.
        assert isinstance(await admission.admit(ask(gateway_key(2, rpm_limit=5), "r2")), Admitted)


async def test_keys_without_limits_skip_the_backend() -> None:
    ledger = Ledger({}, fail=True)
    async with open_admission(LimitsSettings(), ledger) as admission:
        verdict = await admission.admit(ask(gateway_key(), "r1"))
        assert isinstance(verdict, Admitted)
        assert verdict.reservation.checks == ()
        assert verdict.headers == ()
        admission.settle(verdict.reservation, 100, Decimal(1))
    assert ledger.calls == []


async def test_settle_once_and_release_keeps_the_request_count() -> None:
    async with open_admission(LimitsSettings(), no_spend) as admission:
        key = gateway_key(rpm_limit=2, tpm_limit=100, max_concurrency=1)
        first = await admission.admit(ask(key, "a", estimated_tokens=90))
        assert isinstance(first, Admitted)
        assert isinstance(await admission.admit(ask(key, "b", estimated_tokens=5)), Refused)  # concurrency
        admission.release(first.reservation)
        admission.settle(first.reservation, 500, Decimal(0))  # a second settle is ignored
        state = await admission.limit_state(key, now())
        used = {entry["name"]: entry["used"] for entry in state["limits"]}
        assert used == {"rpm": 1, "tpm": 0, "concurrency": 0}
        assert isinstance(await admission.admit(ask(key, "c", estimated_tokens=100)), Admitted)
        refused = await admission.admit(ask(key, "d"))
        assert isinstance(refused, Refused)
        assert refused.limit_name in {"rpm", "concurrency"}


async def test_divided_local_limits_without_redis() -> None:
    async with open_admission(LimitsSettings(instances=2), no_spend) as admission:
        results = await admit_all(admission, [ask(gateway_key(rpm_limit=10), f"r{i}") for i in range(30)])
    assert sum(isinstance(r, Admitted) for r in results) == 5


async def test_provider_key_predicate_is_exact_in_process(autojump_clock: trio.testing.MockClock) -> None:
    async with open_admission(LimitsSettings(), no_spend) as admission:
        key = gateway_key(rpm_limit=100)
        pk = provider_key(3, rpm_limit=2)
        assert admission.provider_key_admissible(3, now())  # never seen: nothing known against it
        for rid in ("a", "b"):
            assert isinstance(await admission.admit(ask(key, rid, provider_key=pk)), Admitted)
        assert not admission.provider_key_admissible(3, now())
        refused = await admission.admit(ask(key, "c", provider_key=pk))
        assert isinstance(refused, Refused)
        assert refused.scope is Scope.PROVIDER_KEY
        await trio.sleep(60)
        assert admission.provider_key_admissible(3, now())


async def test_limit_state_reports_counts_spend_today_and_budget_left() -> None:
    ledger = Ledger({(Scope.GATEWAY_KEY, 1, Measure.COST): 2_500_000_000})
    async with open_admission(LimitsSettings(), ledger) as admission:
        key = gateway_key(rpm_limit=10, budget=Decimal("10"), budget_period="daily")
        verdict = await admission.admit(ask(key, "a", estimated_cost=Decimal("0.5")))
        assert isinstance(verdict, Admitted)
        admission.settle(verdict.reservation, 10, Decimal("0.25"))
        state = await admission.limit_state(key, now())
    assert state["backend"] == "local"
    assert state["budget_left_usd"] == "7.25"
    assert state["spend_today_usd"] == "2.5"  # no daily cost counter: the database's figure
    rpm = state["limits"][0]
    assert (rpm["name"], rpm["used"], rpm["remaining"], rpm["window_seconds"]) == ("rpm", 1, 9, 60)
    budget = state["limits"][1]
    assert (budget["period"], budget["resets_at"]) == ("daily", BASE - 3600.0 + DAY)


async def test_unpriced_model_on_a_budgeted_key() -> None:
    async with open_admission(LimitsSettings(), no_spend) as admission:
        verdict = await admission.admit(
            ask(gateway_key(budget=Decimal(1)), "a", model="x", estimated_cost=None)
        )
    assert isinstance(verdict, Refused)
    assert verdict.kind is RefusalKind.UNPRICED


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="instances"):
        LimitsSettings(instances=0)
