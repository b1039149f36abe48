"""The limiter's facade: admit, settle, release, and the views the balancer and the admin plane read.

Request path (``forward.py``)::

    verdict = await admission.admit(AdmissionRequest(...))    # before the upstream exchange
    if isinstance(verdict, Refused): answer verdict.status_for(dialect) with verdict.headers
    ...exchange...
    finally: admission.settle(verdict.reservation, tokens, cost)  # or admission.release(...) on failure

``settle`` and ``release`` never wait (they are safe in a ``finally`` that runs while cancelled): an in-process
backend applies them at once; for a shared backend (Redis, or the supervisor of a worker group) they are queued
and applied by :meth:`Admission.run`, retried through an outage. Until then the reservation keeps holding its
estimate, which errs on the safe side.

Resource handling: :func:`open_admission` owns the Redis client and the settlement tasks; on exit it gives queued
settlements a bounded grace to reach the shared backend. Error handling: its failures never reach the caller; they
switch decisions to the configured policy (:mod:`trioproxy.limits.policy`), logged once per outage. A counter whose
spend so far cannot be read from the database refuses its requests with 503 (whatever the policy): admitting
them could overspend a budget the database knows is exhausted.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import trio

from trioproxy.limits.local import LocalBackend
from trioproxy.limits.model import (
    RATE_WINDOW,
    AdmissionRequest,
    Admitted,
    Answer,
    Check,
    CheckKind,
    Measure,
    NeedsSeed,
    Plan,
    RefusalKind,
    Refused,
    Reservation,
    Scope,
    build_plan,
    day_period,
    decide,
    gateway_key_checks,
    nano_to_usd,
    provider_key_checks,
    reservation_for,
    retry_after_for,
    usd_to_nano,
    user_checks,
)
from trioproxy.limits.policy import FailurePolicy, LimitsSettings, RedisHealth
from trioproxy.limits.seed import SpendQuery, SpendSource, no_spend, query_for
from trioproxy.snapshot import GatewayKeyView, ProviderKeyView, Snapshot, UserLimitsView

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trioproxy.worker_link import SupervisorLink

logger = logging.getLogger(__name__)

# Rounds of "seed the missing counters, then ask again" before giving up (a counter vanishing twice in a row).
MAX_SEED_ROUNDS = 3
# Parallel settlement tasks for Redis (one EVALSHA each, about 0.2 ms: some thousands per second each).
SETTLE_WORKERS = 4
# On shutdown, how long queued settlements may take to reach Redis.
DRAIN_GRACE = 5.0
# Database sums running at once (each holds a worker thread and a connection).
SEED_THREADS = 2


class SharedBackend(Protocol):
    """Counters shared by several processes: Redis (:class:`~trioproxy.limits.redis_backend.RedisBackend`), or
    the supervisor of a worker group (:class:`~trioproxy.worker_link.SupervisorLimits`)."""

    name: str  # what reservations record as their backend
    description: str  # for log lines: "Redis", "the supervisor"
    errors: tuple[type[BaseException], ...]  # an outage: the policy applies
    refusal: tuple[type[BaseException], ...]  # the backend answered with an error: this decision only

    async def reserve(self, plan: Plan) -> Answer: ...

    async def settle(self, reservation: Reservation, actual_tokens: int, actual_cost_nano: int) -> bool: ...

    async def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None: ...

    async def used(self, checks: Sequence[Check], now: float) -> list[int | None]: ...


class Admission:
    """Admission control for one process; see the module docstring. Construct with :func:`open_admission`."""

    def __init__(
        self,
        settings: LimitsSettings,
        spend: SpendSource,
        shared: SharedBackend | None = None,
        *,
        processes: int | None = None,
    ) -> None:
        self.settings = settings
        self._spend = spend
        self._shared = shared
        # coredis is imported only when Redis is configured (it weighs ~14 MB per process): the exception
        # classes come from the backend; without one, these never match.
        self._shared_errors: tuple[type[BaseException], ...] = () if shared is None else shared.errors
        self._shared_refusal: tuple[type[BaseException], ...] = () if shared is None else shared.refusal
        # The processes that would share the limits if the shared backend were gone: each gets its share.
        divisor = processes if processes is not None else settings.instances
        # Without a shared backend the limits are exact in this process.
        self._local = LocalBackend("local", divisor=divisor) if shared is None else None
        self._fallback = (
            LocalBackend("fallback", divisor=divisor)
            if shared is not None and settings.on_redis_failure is FailurePolicy.FAIL_OPEN_LOCAL
            else None
        )
        self._divisor = divisor
        self._health = RedisHealth(settings.redis_retry_interval)
        self._seeding: dict[str, trio.Event] = {}
        self._seed_limiter = trio.CapacityLimiter(SEED_THREADS)
        self._open: set[str] = set()  # reservations not settled yet (a second settle is ignored)
        # (reservation, tokens, cost, undo): undo items take back a reservation Redis may or may not have made.
        self._pending: deque[tuple[Reservation, int, int, bool]] = deque(maxlen=settings.settle_queue_size)
        self._work = trio.Event()
        self._in_flight = 0
        self._idle = trio.Event()
        self._provider_keys: dict[int, ProviderKeyView] = {}
        self._provider_blocked_until: dict[int, float] = {}
        self.stats = {"admitted": 0, "refused": 0, "degraded": 0, "settle_dropped": 0, "seeded": 0}

    def __repr__(self) -> str:
        return (
            f"<Admission backend={self.backend_name} open={len(self._open)} pending={len(self._pending)} "
            f"{self._health!r}>"
        )

    @property
    def backend_name(self) -> str:
        if self._shared is None:
            return "local"
        if self._health.down:
            return "fallback" if self._fallback is not None else "none"
        return self._shared.name

    # -- admission --------------------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Admitted | Refused:
        """Reserve the request on every limit that applies to it, or refuse it without reserving anything.

        The caller must keep the reservation of an :class:`Admitted` (before its next checkpoint) and settle
        or release it exactly once.
        """
        plan = build_plan(request)
        if isinstance(plan, Refused):
            self.stats["refused"] += 1
            return plan
        if request.provider_key is not None:
            self._provider_keys[request.provider_key.id] = request.provider_key
        if not plan.checks:
            return Admitted(reservation_for(plan, "none"))
        for _ in range(MAX_SEED_ROUNDS):
            backend, answer = await self._reserve(plan)
            if isinstance(answer, Refused):
                self.stats["refused"] += 1
                return answer
            if isinstance(answer, NeedsSeed):
                refused = await self._seed(backend, plan, answer)
                if refused is not None:
                    self.stats["refused"] += 1
                    return refused
                continue
            verdict = decide(plan, answer, backend)
            if isinstance(verdict, Admitted):
                self.stats["admitted"] += 1
                if verdict.reservation.checks:
                    self._open.add(plan.rid)
            else:
                self.stats["refused"] += 1
                self._note_provider_refusal(plan, answer)
            return verdict
        return _unavailable("the limit counters could not be initialised")

    async def _reserve(self, plan: Plan) -> tuple[str, Answer | Refused]:
        if self._local is not None:
            return self._local.name, self._local.reserve(plan)
        assert self._shared is not None
        if self._health.should_try(trio.current_time()):
            try:
                # Shielded and bounded: a reservation made in Redis must come back to its caller, even when
                # the client hung up meanwhile, or it would hold its lease for minutes.
                with trio.fail_after(self.settings.redis_timeout, shield=True):
                    answer = await self._shared.reserve(plan)
            except self._shared_refusal as exc:
                # Redis answered, with an error (a key of the wrong type, a script error): not an outage, so
                # the other keys stay on Redis; this request gets the policy.
                logger.error("limits: %s rejected a decision: %s", self._shared.description, exc)
            except self._shared_errors as exc:
                self._shared_failed(exc)
                # The script may have run before the reply was lost: undo it once Redis is back.
                self._enqueue(reservation_for(plan, self._shared.name), 0, 0, undo=True)
            else:
                self._shared_succeeded()
                return self._shared.name, answer
        self.stats["degraded"] += 1
        if self._fallback is None:
            return "none", _unavailable("the shared limits store is unreachable")
        return self._fallback.name, self._fallback.reserve(plan)

    async def _seed(self, backend: str, plan: Plan, missing: NeedsSeed) -> Refused | None:
        """Start the missing counters at the database's spend so far (one query per counter, shared by
        concurrent admissions that miss the same counter)."""
        checks = [plan.checks[i] for i in missing.indices]
        mine = [c for c in checks if f"{backend}:{c.key}" not in self._seeding]
        theirs = [
            self._seeding[f"{backend}:{c.key}"] for c in checks if f"{backend}:{c.key}" in self._seeding
        ]
        for check in mine:
            self._seeding[f"{backend}:{check.key}"] = trio.Event()
        try:
            if mine:
                try:
                    values = await self._read_spend([query_for(c) for c in mine])
                except Exception as exc:
                    logger.error(
                        "limits: cannot read the spend so far from the database (%s)", type(exc).__name__
                    )
                    return _unavailable("the spend so far cannot be read")
                self.stats["seeded"] += len(mine)
                await self._store_seeds(backend, list(zip(mine, values, strict=True)), plan.now)
        finally:
            for check in mine:
                self._seeding.pop(f"{backend}:{check.key}").set()
        for event in theirs:
            with trio.move_on_after(self.settings.seed_timeout):
                await event.wait()
        return None

    async def _store_seeds(self, backend: str, items: list[tuple[Check, int]], now: float) -> None:
        if self._shared is not None and backend == self._shared.name:
            try:
                with trio.fail_after(self.settings.redis_timeout, shield=True):
                    await self._shared.seed(items, now)
            except self._shared_errors as exc:
                self._shared_failed(exc)  # the next round goes to the policy
            else:
                self._shared_succeeded()
            return
        local = self._local if backend == "local" else self._fallback
        if local is not None:
            for check, value in items:
                local.seed(check, value)

    # -- settlement -------------------------------------------------------------------------------------------

    def settle(self, reservation: Reservation, actual_tokens: int, actual_cost: Decimal | None) -> None:
        """Replace the reservation's estimate by the actual usage and end its lease. Never waits; a second
        call for the same reservation is ignored. ``actual_cost`` None (no price) counts as 0."""
        if reservation.rid not in self._open:
            return
        self._open.discard(reservation.rid)
        cost = 0 if actual_cost is None else max(0, usd_to_nano(actual_cost))
        tokens = max(0, int(actual_tokens))
        if self._shared is not None and reservation.backend == self._shared.name:
            self._enqueue(reservation, tokens, cost)
            return
        local = self._local if reservation.backend == "local" else self._fallback
        if local is not None:
            local.settle(reservation, tokens, cost)

    def release(self, reservation: Reservation) -> None:
        """The request used nothing (it failed before the provider produced anything): give it all back.

        Request counts (RPM, RPD) stay: the attempt was made."""
        self.settle(reservation, 0, Decimal(0))

    def _enqueue(self, reservation: Reservation, tokens: int, cost: int, *, undo: bool = False) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.stats["settle_dropped"] += 1
            if self.stats["settle_dropped"] == 1 or self.stats["settle_dropped"] % 1000 == 0:
                logger.error("limits: settlement queue full; %s dropped so far", self.stats["settle_dropped"])
        self._pending.append((reservation, tokens, cost, undo))
        self._work.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply queued settlements to Redis, retrying through outages; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(SETTLE_WORKERS):
                nursery.start_soon(self._settle_worker)
            task_status.started()

    async def _settle_worker(self) -> None:
        assert self._shared is not None
        while True:
            if not self._pending:
                self._work = trio.Event() if self._work.is_set() else self._work
                await self._work.wait()
                continue
            if not self._health.should_try(trio.current_time()):
                await trio.sleep(self.settings.redis_retry_interval)
                continue
            item = self._pending.popleft()
            self._in_flight += 1
            try:
                with trio.fail_after(self.settings.redis_timeout):
                    await self._shared.settle(*item[:3])
            except self._shared_refusal as exc:
                # Retrying cannot help.
                logger.error("limits: %s rejected a settlement (dropped): %s", self._shared.description, exc)
            except self._shared_errors as exc:
                self._pending.appendleft(item)  # idempotent by its marker: a retry counts once
                self._shared_failed(exc)
            except BaseException:
                self._pending.appendleft(item)  # cancelled: keep it for drain() or the log line on exit
                raise
            else:
                self._shared_succeeded()
            finally:
                self._in_flight -= 1
                self._idle.set()  # drain() looks again

    async def drain(self) -> None:
        """Wait until the queued settlements reached Redis (the caller bounds this with a deadline); returns at
        once while Redis is known to be down."""
        while (self._pending or self._in_flight) and self._shared is not None and not self._health.down:
            self._idle = trio.Event()
            await self._idle.wait()
        lost = sum(1 for *_, undo in self._pending if not undo)
        if lost:
            # Their reservations keep holding the estimates until their leases end.
            where = self._shared.description if self._shared is not None else "the shared backend"
            logger.error("limits: %s settlements could not reach %s", lost, where)

    # -- health -----------------------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self._shared.description if self._shared is not None else "the shared backend"

    def _shared_failed(self, exc: BaseException) -> None:
        if self._health.failed(trio.current_time()):
            policy = self.settings.on_redis_failure
            detail = (
                f"local limits divided by {self._divisor}"
                if policy is FailurePolicy.FAIL_OPEN_LOCAL
                else "requests with limits are refused"
            )
            logger.warning(
                "limits: %s unreachable (%s); applying %s: %s",
                self._where,
                type(exc).__name__,
                policy,
                detail,
            )

    def _shared_succeeded(self) -> None:
        if self._health.succeeded():
            logger.warning("limits: %s reachable again after %s failures", self._where, self._health.failures)
            self._health.failures = 0
            if self._fallback is not None:
                # Its counters describe the outage only; the next outage seeds afresh from the database.
                self._fallback.clear()

    # -- the balancer's view ----------------------------------------------------------------------------------

    def provider_key_admissible(self, key_id: int, now: float) -> bool:
        """Cheap, synchronous: False when the provider key is known to be at one of its own limits.

        In-process backends answer exactly. With Redis it is a hint from this instance's last refusal for the
        key (until that refusal's Retry-After); admission itself stays exact and refuses with
        ``scope == Scope.PROVIDER_KEY``, upon which the caller should pick another key.
        """
        local = self._local if self._local is not None else (self._fallback if self._health.down else None)
        if local is None:
            return now >= self._provider_blocked_until.get(key_id, 0.0)
        key = self._provider_keys.get(key_id)
        if key is None:
            return True
        return all(local.has_room(check, now) for check in provider_key_checks(key, now, 1))

    def _note_provider_refusal(self, plan: Plan, answer: Answer) -> None:
        if isinstance(answer, NeedsSeed):
            return
        for check, result in zip(plan.checks, answer, strict=True):
            if check.scope is Scope.PROVIDER_KEY and not result.ok:
                wait = retry_after_for(plan.now, check, result)
                until = plan.now + (wait if wait is not None else 60.0)
                previous = self._provider_blocked_until.get(check.subject_id, 0.0)
                self._provider_blocked_until[check.subject_id] = max(previous, until)

    # -- the admin plane's view -------------------------------------------------------------------------------

    async def limit_state(
        self, key: GatewayKeyView, now: float, user: UserLimitsView | None = None
    ) -> dict[str, Any]:
        """Current window counts, spend today and budget left of a gateway key (JSON-ready; money as decimal
        strings in USD). Counts include open reservations; counters not in use yet are read from the database."""
        checks = gateway_key_checks(key, now, 0, 0) + (user_checks(user, now, 0) if user is not None else [])
        backend, used = await self._current(checks, now)
        missing = [i for i, value in enumerate(used) if value is None]
        queries = [query_for(checks[i]) for i in missing]
        daily_cost = next(
            (i for i, c in enumerate(checks) if c.key.startswith(f"gk:{key.id}:daily_cost")), None
        )
        if daily_cost is None:
            queries.append(SpendQuery(Scope.GATEWAY_KEY, key.id, Measure.COST, day_period(now).start))
        values = await self._read_spend(queries) if queries else []
        counts = list(used)
        for i, value in zip(missing, values, strict=False):
            counts[i] = value
        limits = [_limit_entry(check, count or 0) for check, count in zip(checks, counts, strict=True)]
        spend_today = counts[daily_cost] if daily_cost is not None else values[-1]
        left = {
            (c.scope, c.name): e["remaining"]
            for c, e in zip(checks, limits, strict=True)
            if c.name == "budget"
        }
        return {
            "gateway_key_id": key.id,
            "backend": backend,
            "limits": limits,
            "spend_today_usd": _usd(spend_today or 0),
            "budget_left_usd": left.get((Scope.GATEWAY_KEY, "budget")),
            "user_budget_left_usd": left.get((Scope.USER, "budget")),
        }

    async def _current(self, checks: list[Check], now: float) -> tuple[str, list[int | None]]:
        if self._shared is not None and not self._health.down:
            try:
                with trio.fail_after(self.settings.redis_timeout):
                    return self._shared.name, await self._shared.used(checks, now)
            except self._shared_errors as exc:
                self._shared_failed(exc)
        local = self._local if self._local is not None else self._fallback
        if local is None:
            return "none", [None] * len(checks)
        return local.name, [local.used(check, now) for check in checks]

    async def _read_spend(self, queries: list[SpendQuery]) -> list[int]:
        if self._spend is no_spend:
            return no_spend(queries)  # nothing to wait for: no worker thread
        with trio.fail_after(self.settings.seed_timeout):
            return await trio.to_thread.run_sync(
                self._spend, queries, limiter=self._seed_limiter, abandon_on_cancel=True
            )


_PERIOD_NAMES = {"d": "daily", "w": "weekly", "m": "monthly", "a": "lifetime"}


def _usd(nano: int) -> str:
    return format(nano_to_usd(nano).normalize(), "f")


def _limit_entry(check: Check, used: int) -> dict[str, Any]:
    money = check.measure is Measure.COST
    remaining = max(0, check.limit - used)
    entry: dict[str, Any] = {
        "scope": check.scope.value,
        "name": check.name,
        "unit": "usd" if money else check.measure.value,
        "limit": _usd(check.limit) if money else check.limit,
        "used": _usd(used) if money else used,
        "remaining": _usd(remaining) if money else remaining,
    }
    if check.kind is CheckKind.WINDOW:
        entry["window_seconds"] = int(RATE_WINDOW)
    if check.period is not None:
        entry["period"] = _PERIOD_NAMES[check.period.id[0]]
        entry["resets_at"] = check.period.end
    return entry


def _unavailable(reason: str) -> Refused:
    return Refused(
        RefusalKind.UNAVAILABLE,
        Scope.GATEWAY_KEY,
        "backend",
        f"limits cannot be checked right now: {reason}",
        1,
        ((b"retry-after", b"1"),),
    )


def find_gateway_key(snapshot: Snapshot, gateway_key_id: int) -> GatewayKeyView | None:
    """A gateway key's view by id (the snapshot maps keys by hash; this is for the admin plane, not hot)."""
    return next((k for k in snapshot.gateway_keys.values() if k.id == gateway_key_id), None)


@contextlib.asynccontextmanager
async def open_admission(
    settings: LimitsSettings,
    spend: SpendSource,
    supervisor: SupervisorLink | None = None,
    *,
    processes: int | None = None,
) -> AsyncIterator[Admission]:
    """The process's :class:`Admission`, shared through Redis with ``settings.redis_url``, else through the
    ``supervisor`` of its worker group, else in-process. The Redis client and the settlement tasks live as long
    as the ``async with`` block.

    ``processes``: how many processes share the limits (instances times workers), each one's share while the
    shared backend is unreachable; ``settings.instances`` when None."""
    if settings.redis_url is not None:
        from trioproxy.limits.redis_backend import RedisBackend

        async with (
            RedisBackend.open(
                settings.redis_url,
                settings.redis_prefix,
                connect_timeout=settings.redis_timeout,
                stream_timeout=settings.redis_timeout,
            ) as redis,
            _settling(Admission(settings, spend, redis, processes=processes)) as admission,
        ):
            yield admission
        return
    if supervisor is not None:
        from trioproxy.worker_link import SupervisorLimits

        async with _settling(
            Admission(settings, spend, SupervisorLimits(supervisor), processes=processes)
        ) as admission:
            yield admission
        return
    yield Admission(settings, spend, processes=processes)


@contextlib.asynccontextmanager
async def _settling(admission: Admission) -> AsyncIterator[Admission]:
    """Run the admission's settlement tasks; on exit, give queued settlements a bounded grace."""
    async with trio.open_nursery() as nursery:
        await nursery.start(admission.run)
        try:
            yield admission
        finally:
            with trio.move_on_after(DRAIN_GRACE, shield=True):
                await admission.drain()
            nursery.cancel_scope.cancel()
