"""The supervisor's Coordinator and the workers' SupervisorLinks, in one process over real socket pairs.

Each "worker" is a :class:`~trioproxy.worker_link.SupervisorLink` on the detached fd of one end of a
``socket.socketpair()``; the Coordinator serves the other end, as ``serve --workers N`` does across processes
(``tests/integration/test_workers_shared.py`` runs the real processes). Everything runs on the autojump clock: the
sockets are in-process, so a deadline fires only when nothing can move any more.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from tests.unit.test_balancer import balancer, gateway, key, snapshot
from tests.unit.test_limits_local import gateway_key
from trioproxy import coordinator as coordinator_module
from trioproxy.balancer import AttemptResult, Balancer, KeyState
from trioproxy.coordinator import REPORT_TIMEOUT, Coordinator
from trioproxy.ipc import ChannelClosed
from trioproxy.limits import (
    AdmissionRequest,
    Admitted,
    FailurePolicy,
    LimitsSettings,
    RefusalKind,
    Refused,
    no_spend,
    open_admission,
)
from trioproxy.limits.model import (
    DAY,
    CheckResult,
    NeedsSeed,
    Plan,
    Reservation,
    build_plan,
    decide,
    reservation_for,
)
from trioproxy.snapshot import ProviderKind, Snapshot
from trioproxy.worker_link import KEY_STATE_RETRY_INTERVAL, LinkedKeyStates, SupervisorLimits, SupervisorLink

BASE = 20_000 * DAY + 3600.0  # the requests' unix time: every plan of a test falls in one window and one day
WALL = 1_722_513_600.0  # the balancers' wall clock (tests.unit.test_balancer)
GUARD = 30.0  # virtual seconds: longer than this is a deadlock


# -- a worker group in one process -----------------------------------------------------------------------------


@dataclass
class Worker:
    index: int
    link: SupervisorLink
    supervisor_side: trio.CancelScope = field(default_factory=trio.CancelScope)  # Coordinator.serve_worker
    worker_side: trio.CancelScope = field(default_factory=trio.CancelScope)  # SupervisorLink.run
    served: trio.Event = field(default_factory=trio.Event)  # serve_worker returned
    link_ended: trio.Event = field(default_factory=trio.Event)  # the link's run returned


class Group:
    def __init__(self, nursery: trio.Nursery, coordinator: Coordinator | None = None) -> None:
        self.nursery = nursery
        self.coordinator = coordinator if coordinator is not None else Coordinator()
        self.workers: dict[int, Worker] = {}

    async def connect(self, index: int, setup: Callable[[SupervisorLink], None] | None = None) -> Worker:
        """Start worker ``index``: ``setup`` registers its handlers before its link runs (as the gateway must)."""
        ours, theirs = socket.socketpair()
        link = SupervisorLink(theirs.detach(), index)
        if setup is not None:
            setup(link)
        worker = self.workers[index] = Worker(index, link)
        self.nursery.start_soon(self._serve, worker, ours)
        await self.nursery.start(self._run_link, worker)
        await trio.testing.wait_all_tasks_blocked()  # the coordinator has registered its channel
        return worker

    async def _serve(self, worker: Worker, sock: socket.socket) -> None:
        with worker.supervisor_side:
            await self.coordinator.serve_worker(worker.index, sock)
        worker.served.set()

    async def _run_link(
        self, worker: Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with worker.worker_side:
            await worker.link.run(task_status=task_status)
        worker.link_ended.set()

    async def stop_supervisor(self) -> None:
        """The supervisor's ends close (it died): every link's run returns by itself."""
        for worker in self.workers.values():
            worker.supervisor_side.cancel()
        with trio.fail_after(GUARD):
            for worker in self.workers.values():
                await worker.link_ended.wait()


async def eventually(predicate: Callable[[], bool], timeout: float = GUARD) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def plan_of(request: AdmissionRequest) -> Plan:
    plan = build_plan(request)
    assert isinstance(plan, Plan)
    return plan


def results(answer: object) -> tuple[CheckResult, ...]:
    assert isinstance(answer, tuple)
    return answer


# -- limits ----------------------------------------------------------------------------------------------------


async def test_two_workers_reserve_on_one_counter(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    workers = [await group.connect(0), await group.connect(1)]
    limits = [SupervisorLimits(w.link) for w in workers]
    key_rpm5 = gateway_key(rpm_limit=5)
    verdicts = []
    for i in range(10):
        plan = plan_of(AdmissionRequest(f"r{i}", key_rpm5, BASE))
        verdicts.append(decide(plan, results(await limits[i % 2].reserve(plan)), limits[i % 2].name))
    assert [isinstance(v, Admitted) for v in verdicts] == [True] * 5 + [False] * 5
    assert {v.kind for v in verdicts if isinstance(v, Refused)} == {RefusalKind.RATE}
    assert {v.reservation.backend for v in verdicts if isinstance(v, Admitted)} == {"supervisor"}
    (rpm,) = plan_of(AdmissionRequest("probe", key_rpm5, BASE)).checks
    assert await limits[1].used([rpm], BASE) == [5]
    assert group.coordinator.used([rpm], BASE) == [5]


async def test_seed_used_and_settle_once_across_workers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    limits0 = SupervisorLimits((await group.connect(0)).link)
    limits1 = SupervisorLimits((await group.connect(1)).link)
    plan = plan_of(AdmissionRequest("r1", gateway_key(daily_token_limit=1000), BASE, estimated_tokens=100))
    (daily,) = plan.checks
    # A day counter starts at the database's spend so far: until a worker seeds it, nobody may count on it.
    assert await limits0.reserve(plan) == NeedsSeed((0,))
    assert await limits1.used([daily], BASE) == [None]
    await limits1.seed([(daily, 200)], BASE)
    await limits0.seed([(daily, 0)], BASE)  # a second seed (a concurrent first use) changes nothing
    assert await limits0.used([daily], BASE) == [200]
    (result,) = results(await limits0.reserve(plan))
    assert result.ok and result.used == 200
    assert await limits1.used([daily], BASE) == [300]  # the estimate is held
    reservation = reservation_for(plan, "supervisor")
    assert await limits0.settle(reservation, 30, 0) is True
    assert await limits1.used([daily], BASE) == [230]
    # A settlement retried after a lost reply (from whichever worker) counts once.
    assert await limits1.settle(reservation, 30, 0) is False
    assert await limits0.settle(reservation, 30, 0) is False
    assert await limits0.used([daily], BASE) == [230]


def test_settled_ids_are_forgotten_after_their_lease_and_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    wall = [BASE]
    coordinator = Coordinator(wall_clock=lambda: wall[0])
    monkeypatch.setattr(coordinator_module, "SETTLED_SWEEP_AT", 3)

    def reservation(rid: str) -> Reservation:
        return Reservation(rid, "supervisor", BASE, BASE + 660, ())

    assert [coordinator.settle(reservation(f"r{i}"), 0, 0) for i in range(4)] == [True] * 4
    assert coordinator.settle(reservation("r0"), 0, 0) is False  # a sweep at 3 found nothing expired
    wall[0] = BASE + 660 + coordinator_module.SETTLED_GRACE
    assert coordinator.settle(reservation("r9"), 0, 0) is True  # sweeps r0..r3
    assert coordinator.settle(reservation("r0"), 0, 0) is True
    assert coordinator.settle(reservation("r9"), 0, 0) is False


def test_the_coordinator_of_one_of_several_instances_holds_its_share() -> None:
    coordinator = Coordinator(instances=2)
    key_rpm5 = gateway_key(rpm_limit=5)
    answers = [coordinator.reserve(plan_of(AdmissionRequest(f"r{i}", key_rpm5, BASE))) for i in range(4)]
    assert [results(a)[0].ok for a in answers] == [True, True, False, False]


async def test_admission_of_two_workers_is_exact_then_divided_when_the_supervisor_is_gone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    group = Group(nursery)
    w0, w1 = await group.connect(0), await group.connect(1)
    key_rpm5 = gateway_key(rpm_limit=5)
    async with (
        open_admission(LimitsSettings(), no_spend, w0.link, processes=2) as admission0,
        open_admission(LimitsSettings(), no_spend, w1.link, processes=2) as admission1,
    ):
        admissions = [admission0, admission1]
        verdicts = [
            await admissions[i % 2].admit(AdmissionRequest(f"r{i}", key_rpm5, BASE)) for i in range(10)
        ]
        admitted = [v for v in verdicts if isinstance(v, Admitted)]
        assert len(admitted) == 5
        assert {v.reservation.backend for v in admitted} == {"supervisor"}
        assert {v.kind for v in verdicts if isinstance(v, Refused)} == {RefusalKind.RATE}
        assert admission0.backend_name == admission1.backend_name == "supervisor"

        await group.stop_supervisor()
        with caplog.at_level(logging.WARNING, logger="trioproxy.limits.admission"):
            later = [await admission0.admit(AdmissionRequest(f"f{i}", key_rpm5, BASE)) for i in range(3)]
        # fail_open_local: this worker's share of the limit, 5 // 2, on counters of the outage alone.
        assert [v.reservation.backend if isinstance(v, Admitted) else v.kind for v in later] == [
            "fallback",
            "fallback",
            RefusalKind.RATE,
        ]
        assert admission0.backend_name == "fallback"
        assert admission0.stats["degraded"] == 3
        assert [r.getMessage() for r in caplog.records if r.name == "trioproxy.limits.admission"] == [
            "limits: the supervisor unreachable (ChannelClosed); applying fail_open_local: "
            "local limits divided by 2"
        ]


async def test_fail_closed_refuses_requests_with_limits_when_the_supervisor_is_gone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    worker = await group.connect(0)
    settings = LimitsSettings(on_redis_failure=FailurePolicy.FAIL_CLOSED)
    key_rpm5 = gateway_key(rpm_limit=5)
    async with open_admission(settings, no_spend, worker.link, processes=2) as admission:
        assert isinstance(await admission.admit(AdmissionRequest("r0", key_rpm5, BASE)), Admitted)
        await group.stop_supervisor()
        verdict = await admission.admit(AdmissionRequest("r1", key_rpm5, BASE))
        assert isinstance(verdict, Refused)
        assert (verdict.kind, verdict.limit_name, verdict.retry_after) == (
            RefusalKind.UNAVAILABLE,
            "backend",
            1,
        )
        assert verdict.status_for(ProviderKind.OPENAI) == 503
        assert admission.backend_name == "none"
        # A key without limits never asks the supervisor.
        free = await admission.admit(AdmissionRequest("r2", gateway_key(2), BASE))
        assert isinstance(free, Admitted) and free.reservation.backend == "none"


async def test_a_supervisor_that_does_not_answer_in_time_is_an_outage(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ours, theirs = socket.socketpair()
    with ours:  # the "supervisor" holds its end open and never reads it
        link = SupervisorLink(theirs.detach(), 0)
        await nursery.start(link.run)
        settings = LimitsSettings(redis_timeout=0.5)
        async with open_admission(settings, no_spend, link, processes=4) as admission:
            started = trio.current_time()
            verdicts = [
                await admission.admit(AdmissionRequest(f"r{i}", gateway_key(rpm_limit=8), BASE))
                for i in range(3)
            ]
            assert trio.current_time() - started == pytest.approx(0.5)  # one timeout, then the policy at once
            assert [v.reservation.backend if isinstance(v, Admitted) else v.kind for v in verdicts] == [
                "fallback",
                "fallback",
                RefusalKind.RATE,
            ]


async def test_a_supervisor_error_gets_the_policy_for_that_decision_only(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = Group(nursery)
    worker = await group.connect(0)

    def broken(plan: Plan) -> Any:
        raise RuntimeError("counter of the wrong kind")

    key_rpm5 = gateway_key(rpm_limit=5)
    async with open_admission(LimitsSettings(), no_spend, worker.link, processes=2) as admission:
        monkeypatch.setattr(group.coordinator.limits, "reserve", broken)
        with caplog.at_level(logging.ERROR, logger="trioproxy.limits.admission"):
            first = await admission.admit(AdmissionRequest("r0", key_rpm5, BASE))
        assert isinstance(first, Admitted) and first.reservation.backend == "fallback"
        assert admission.backend_name == "supervisor"  # an answer, not an outage
        assert any(
            "rejected a decision" in r.getMessage()
            and "RuntimeError: counter of the wrong kind" in r.getMessage()
            for r in caplog.records
        )
        monkeypatch.undo()
        second = await admission.admit(AdmissionRequest("r1", key_rpm5, BASE))
        assert isinstance(second, Admitted) and second.reservation.backend == "supervisor"


async def test_settlements_go_through_the_queue_to_the_supervisor_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    worker = await group.connect(0)
    request = AdmissionRequest("r0", gateway_key(tpm_limit=1000), BASE, estimated_tokens=100)
    (tpm,) = plan_of(request).checks
    async with open_admission(LimitsSettings(), no_spend, worker.link, processes=2) as admission:
        verdict = await admission.admit(request)
        assert isinstance(verdict, Admitted)
        assert group.coordinator.used([tpm], BASE) == [100]
        admission.settle(verdict.reservation, 30, None)  # never waits: queued for the settle workers
        admission.settle(verdict.reservation, 70, None)  # a second settle is ignored
        assert group.coordinator.used([tpm], BASE) == [100]
    # Leaving open_admission drained the queue.
    assert group.coordinator.used([tpm], BASE) == [30]


# -- key states ------------------------------------------------------------------------------------------------

KEYS = [key(1), key(2), key(3)]
POOL = gateway((1, 2, 3))
SNAPSHOT = snapshot(KEYS, [POOL])


@dataclass
class KeyWorker:
    worker: Worker
    balancer: Balancer
    states: LinkedKeyStates
    snapshot: list[Snapshot]  # [the snapshot the worker follows]: replace it to "reload"

    def state(self, key_id: int) -> KeyState | None:
        health = self.balancer.key_health(key_id)
        return None if health is None else health.state


async def key_worker(group: Group, index: int, snap: Snapshot = SNAPSHOT) -> KeyWorker:
    b = balancer()
    holder = [snap]
    made: list[LinkedKeyStates] = []

    def setup(link: SupervisorLink) -> None:
        made.append(LinkedKeyStates(b, link, lambda: holder[0], wall_clock=lambda: WALL))

    worker = await group.connect(index, setup)
    await group.nursery.start(made[0].run)
    return KeyWorker(worker, b, made[0], holder)


def fail_with_401(kw: KeyWorker, key_id: int) -> None:
    now = trio.current_time()
    kw.balancer.follow(kw.snapshot[0], now=now)
    kw.balancer.attempt_started(key_id, now=now)
    kw.balancer.attempt_finished(key_id, AttemptResult.status(401), now=now)
    assert kw.state(key_id) is KeyState.INVALID


async def test_a_key_state_one_worker_decides_reaches_the_others_and_later_workers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    w0, w1 = await key_worker(group, 0), await key_worker(group, 1)
    fail_with_401(w0, 1)
    await eventually(lambda: w1.state(1) is KeyState.INVALID)
    health = w1.balancer.key_health(1)
    assert health is not None and health.reason == "provider rejected the key (HTTP 401)"
    assert (w0.states.published, w0.states.applied) == (1, 0)
    assert (w1.states.published, w1.states.applied) == (0, 1)  # an adopted state is not passed on again
    assert (
        repr(group.coordinator)
        == "<Coordinator workers=[0, 1] " + repr(group.coordinator.limits) + " key_states=1>"
    )

    w2 = await key_worker(group, 2)  # starts after the change: gets the whole table
    await eventually(lambda: w2.state(1) is KeyState.INVALID)
    assert (w2.states.published, w2.states.applied) == (0, 1)

    await trio.sleep(3 * KEY_STATE_RETRY_INTERVAL)  # received states are offered again: still adopted once
    assert (w0.states.applied, w1.states.applied, w2.states.applied) == (0, 1, 1)
    assert w0.balancer.transitions == {("active", "invalid"): 1}  # its own state never came back
    assert w1.balancer.transitions == w2.balancer.transitions == {("active", "invalid"): 1}
    assert [w.state(2) for w in (w0, w1, w2)] == [None, None, None]  # nothing else moved


async def test_a_state_for_a_key_the_worker_does_not_know_yet_is_adopted_after_its_reload(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    w0 = await key_worker(group, 0)
    w1 = await key_worker(group, 1, snapshot([key(1), key(2)], [gateway((1, 2))]))
    w0.balancer.follow(SNAPSHOT, now=trio.current_time())
    w0.balancer.mark_invalid(3, "active check: HTTP 401", now=trio.current_time())
    assert w0.states.published == 1
    await eventually(lambda: "key_states=1" in repr(group.coordinator))
    await trio.testing.wait_all_tasks_blocked()  # worker 1 has read the note
    assert w1.state(3) is None and w1.states.applied == 0  # key 3 is not in its snapshot
    w1.snapshot[0] = SNAPSHOT  # its config reloader caught up
    assert w1.state(3) is None
    started = trio.current_time()
    await eventually(lambda: w1.state(3) is KeyState.INVALID)
    assert trio.current_time() - started <= KEY_STATE_RETRY_INTERVAL + 0.01
    assert w1.states.applied == 1


async def test_a_restarted_worker_adopts_the_states_its_previous_process_decided(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    w0, w1 = await key_worker(group, 0), await key_worker(group, 1)
    fail_with_401(w0, 1)
    await eventually(lambda: w1.state(1) is KeyState.INVALID)
    w0.worker.worker_side.cancel()  # worker 0 dies ...
    with trio.fail_after(GUARD):
        await w0.worker.served.wait()
    restarted = await key_worker(group, 0)  # ... and the supervisor starts it again, with the same index
    await eventually(lambda: restarted.state(1) is KeyState.INVALID, timeout=5 * KEY_STATE_RETRY_INTERVAL)


async def test_states_sent_before_the_balancer_exists_are_held_until_it_subscribes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The gateway starts its link first and builds its balancer later (app.run_gateway); the supervisor sends
    # its table as soon as the link connects. Nothing sent in between may be lost.
    group = Group(nursery)
    w0 = await key_worker(group, 0)
    fail_with_401(w0, 1)
    await eventually(lambda: "key_states=1" in repr(group.coordinator))
    late = await group.connect(1)  # running, with no key state handler yet
    fail_with_401(w0, 2)  # a note that arrives while the worker is still starting
    await trio.testing.wait_all_tasks_blocked()
    b = balancer()
    states = LinkedKeyStates(b, late.link, lambda: SNAPSHOT, wall_clock=lambda: WALL)
    assert [getattr(b.key_health(key_id), "state", None) for key_id in (1, 2)] == [KeyState.INVALID] * 2
    assert states.applied == 2


# -- reports ---------------------------------------------------------------------------------------------------


async def test_gather_returns_every_live_workers_report_by_index(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    group = Group(nursery)
    workers = {i: await group.connect(i) for i in (2, 0, 1)}  # not in index order

    def failing() -> Any:
        raise RuntimeError("metrics are broken")

    for i, worker in workers.items():
        worker.link.add_reporter("x", functools.partial(dict, worker=i))
    workers[0].link.add_reporter("y", failing)
    workers[1].link.add_reporter("y", lambda: "y1")  # worker 2 has no "y" report

    assert await workers[1].link.gather("x") == [{"worker": 0}, {"worker": 1}, {"worker": 2}]
    assert await workers[2].link.gather("x") == [{"worker": 0}, {"worker": 1}, {"worker": 2}]
    with caplog.at_level(logging.WARNING, logger="trioproxy.coordinator"):
        assert await workers[1].link.gather("y") == ["y1"]
    assert sorted(r.getMessage() for r in caplog.records if r.name == "trioproxy.coordinator") == [
        "worker 0 did not report y: RemoteError",
        "worker 2 did not report y: RemoteError",
    ]

    workers[2].worker_side.cancel()  # worker 2 exits
    assert await workers[0].link.gather("x") == [{"worker": 0}, {"worker": 1}]
    with trio.fail_after(GUARD):
        await workers[2].served.wait()
    assert repr(group.coordinator).startswith("<Coordinator workers=[0, 1] ")
    assert await workers[0].link.gather("x") == [{"worker": 0}, {"worker": 1}]


async def test_a_worker_that_does_not_answer_is_left_out_after_the_report_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    group = Group(nursery)
    workers = [await group.connect(0), await group.connect(1)]
    for i, worker in enumerate(workers):
        worker.link.add_reporter("x", functools.partial(int, i))
    ours, stuck = socket.socketpair()
    with stuck:  # a worker that never reads its end
        nursery.start_soon(group.coordinator.serve_worker, 2, ours)
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        assert await workers[1].link.gather("x") == [0, 1]
        assert trio.current_time() - started == pytest.approx(REPORT_TIMEOUT)


async def test_a_link_that_is_not_running_refuses_calls_and_notes() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = SupervisorLink(theirs.fileno(), 0)
        with pytest.raises(ChannelClosed, match="not running"):
            await link.call("used", [], BASE)
        with pytest.raises(ChannelClosed, match="not running"):
            link.notify("key_state", 1, {})
        with pytest.raises(ChannelClosed, match="not running"):
            await link.gather("x")
