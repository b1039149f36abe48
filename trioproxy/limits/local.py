"""The in-process backend: exact limits for one process, synchronous and allocation-light (sans-IO).

It executes a :class:`~trioproxy.limits.model.Plan` the same way the Redis script does, on plain Python
structures: a window is a time-ordered log of ``[time, amount, rid]`` entries plus their running sum; a counter
is a per-period total that includes the reservations still open, with a heap of their lease expiries; a gauge
is a dict of leases. Nothing here awaits, so a plan is atomic simply because trio never switches tasks inside
a synchronous call.

``divisor``: when this backend stands in for a shared one (Redis unreachable) or serves one of N workers without
Redis, each process may use only its share: rates and concurrency get ``limit // divisor``; a counter seeded
with the spend so far ``S`` gets ``S + (limit - S) // divisor``. The sum over the N processes then stays within
the limit (never ``limit`` per process).

Resource handling: memory is bounded by what is live: window entries of the last minute, open reservations,
leases, and one counter per subject and period (expired periods are dropped every minute).
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from dataclasses import dataclass, field

from trioproxy.limits.model import (
    KEY_GRACE,
    RATE_WINDOW,
    Answer,
    Check,
    CheckKind,
    CheckResult,
    NeedsSeed,
    Plan,
    Reservation,
    settled_amount,
)

# How often expired period counters are dropped (their period ended).
PURGE_INTERVAL = 60.0


@dataclass(slots=True)
class _Window:
    entries: deque[list[float | int | str]] = field(default_factory=deque)  # [time, amount, rid], by time
    total: int = 0
    by_rid: dict[str, list[float | int | str]] = field(default_factory=dict)

    def expire(self, now: float) -> None:
        cutoff = now - RATE_WINDOW
        entries = self.entries
        while entries and float(entries[0][0]) <= cutoff:
            _, amount, rid = entries.popleft()
            self.total -= int(amount)
            self.by_rid.pop(str(rid), None)

    def add(self, now: float, amount: int, rid: str) -> None:
        entry: list[float | int | str] = [now, amount, rid]
        if self.entries and float(self.entries[-1][0]) > now:
            # A caller whose clock reading is a little older than the last one: keep the log ordered.
            times = [float(e[0]) for e in self.entries]
            self.entries.insert(bisect.bisect_right(times, now), entry)
        else:
            self.entries.append(entry)
        self.total += amount
        self.by_rid[rid] = entry

    def retry_in(self, now: float, amount: int, limit: int) -> float | None:
        """Seconds until ``amount`` more fits: the oldest entries expire first."""
        left = self.total
        for time, entry_amount, _ in self.entries:
            left -= int(entry_amount)
            if left + amount <= limit:
                return float(time) + RATE_WINDOW - now
        return None


@dataclass(slots=True)
class _Counter:
    value: int
    seed: int  # the value it was seeded with (the spend before this process counted)
    expires_at: float | None
    reservations: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (amount, lease end)
    leases: list[tuple[float, str]] = field(default_factory=list)  # heap of (lease end, rid)

    def sweep(self, now: float) -> None:
        """Give back what reservations of dead requests still hold (their lease ended unsettled)."""
        leases = self.leases
        while leases and leases[0][0] <= now:
            _, rid = heapq.heappop(leases)
            held = self.reservations.pop(rid, None)
            if held is not None:
                self.value -= held[0]

    def reserved(self) -> int:
        return sum(amount for amount, _ in self.reservations.values())


class LocalBackend:
    """Exact limits inside one process. ``name`` tells reservations which backend holds them."""

    def __init__(self, name: str = "local", *, divisor: int = 1) -> None:
        if divisor < 1:
            raise ValueError("divisor must be at least 1")
        self.name = name
        self.divisor = divisor
        self._windows: dict[str, _Window] = {}
        self._counters: dict[str, _Counter] = {}
        self._gauges: dict[str, dict[str, float]] = {}
        self._next_purge = 0.0

    def __repr__(self) -> str:
        return (
            f"<LocalBackend {self.name} windows={len(self._windows)} counters={len(self._counters)} "
            f"gauges={len(self._gauges)}>"
        )

    def clear(self) -> None:
        """Forget everything (a stand-in backend whose shared backend is back)."""
        self._windows.clear()
        self._counters.clear()
        self._gauges.clear()

    # -- decisions --------------------------------------------------------------------------------------------

    def reserve(self, plan: Plan) -> Answer:
        """Check every limit of the plan; when all pass, reserve on all of them (all or nothing)."""
        now = plan.now
        self._purge(now)
        missing = tuple(
            i
            for i, check in enumerate(plan.checks)
            if check.kind is CheckKind.COUNTER and check.key not in self._counters
        )
        if missing:
            return NeedsSeed(missing)
        results = tuple(self._check(check, now) for check in plan.checks)
        if all(result.ok for result in results):
            for check in plan.checks:
                self._apply(check, plan)
        return results

    def _limit(self, check: Check) -> int:
        if self.divisor == 1:
            return check.limit
        if check.kind is CheckKind.COUNTER:
            seed = self._counters[check.key].seed
            return seed + max(0, check.limit - seed) // self.divisor
        return check.limit // self.divisor

    def _check(self, check: Check, now: float) -> CheckResult:
        limit = self._limit(check)
        if check.kind is CheckKind.WINDOW:
            window = self._windows.get(check.key)
            if window is None:
                return CheckResult(check.amount <= limit, 0, 0.0, None)
            window.expire(now)
            used = window.total
            reset = float(window.entries[-1][0]) + RATE_WINDOW - now if window.entries else 0.0
            if used + check.amount <= limit:
                return CheckResult(True, used, reset)
            retry = window.retry_in(now, check.amount, limit) if check.amount <= limit else None
            return CheckResult(False, used, reset, retry)
        if check.kind is CheckKind.COUNTER:
            counter = self._counters[check.key]
            counter.sweep(now)
            used = counter.value
            if used + check.amount <= limit:
                return CheckResult(True, used)
            # Room may come back soon if only open reservations stand in the way.
            soon = used - counter.reserved() + check.amount <= limit
            return CheckResult(False, used, None, 1.0 if soon else None)
        leases = self._gauges.get(check.key)
        if leases:
            for rid in [rid for rid, until in leases.items() if until <= now]:
                del leases[rid]
        used = len(leases) if leases else 0
        return CheckResult(used + 1 <= limit, used)

    def _apply(self, check: Check, plan: Plan) -> None:
        if check.kind is CheckKind.WINDOW:
            self._windows.setdefault(check.key, _Window()).add(plan.now, check.amount, plan.rid)
        elif check.kind is CheckKind.COUNTER:
            counter = self._counters[check.key]
            counter.value += check.amount
            if check.settles:
                counter.reservations[plan.rid] = (check.amount, plan.lease_until)
                heapq.heappush(counter.leases, (plan.lease_until, plan.rid))
        else:
            self._gauges.setdefault(check.key, {})[plan.rid] = plan.lease_until

    def settle(self, reservation: Reservation, actual_tokens: int, actual_cost_nano: int) -> None:
        """Replace the reservation by the actual usage and end its lease (idempotent per reservation)."""
        rid = reservation.rid
        for check in reservation.checks:
            if check.kind is CheckKind.GAUGE:
                leases = self._gauges.get(check.key)
                if leases is not None:
                    leases.pop(rid, None)
                continue
            actual = settled_amount(check, actual_tokens, actual_cost_nano)
            if check.kind is CheckKind.WINDOW:
                window = self._windows.get(check.key)
                entry = window.by_rid.get(rid) if window is not None else None
                if window is not None and entry is not None:
                    window.total += actual - int(entry[1])
                    entry[1] = actual
                    del window.by_rid[rid]  # settled: a second settle must not move it again
                continue
            counter = self._counters.get(check.key)
            if counter is None:
                continue  # its period is over, or this backend was cleared
            held = counter.reservations.pop(rid, None)
            # Without its reservation (the lease ran out and the sweep gave the estimate back) the usage still
            # happened: count it in full. Settling twice is the caller's bug; the facade forwards one settle.
            counter.value += actual - (held[0] if held is not None else 0)

    def seed(self, check: Check, value: int) -> None:
        """Start a counter at the spend the database knows, unless it exists already."""
        if check.key in self._counters:
            return
        end = check.period.end if check.period is not None else None
        self._counters[check.key] = _Counter(
            value=value, seed=value, expires_at=None if end is None else end + KEY_GRACE
        )

    def _purge(self, now: float) -> None:
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL
        for key in [k for k, c in self._counters.items() if c.expires_at is not None and c.expires_at <= now]:
            del self._counters[key]
        for window in self._windows.values():
            window.expire(now)
        for key in [k for k, w in self._windows.items() if not w.entries]:
            del self._windows[key]
        for key in [k for k, g in self._gauges.items() if all(until <= now for until in g.values())]:
            del self._gauges[key]

    # -- reading ----------------------------------------------------------------------------------------------

    def used(self, check: Check, now: float) -> int | None:
        """What the check's counter holds now (None: a counter not seeded yet); does not reserve."""
        if check.kind is CheckKind.WINDOW:
            window = self._windows.get(check.key)
            if window is None:
                return 0
            window.expire(now)
            return window.total
        if check.kind is CheckKind.COUNTER:
            counter = self._counters.get(check.key)
            if counter is None:
                return None
            counter.sweep(now)
            return counter.value
        leases = self._gauges.get(check.key, {})
        return sum(1 for until in leases.values() if until > now)

    def has_room(self, check: Check, now: float) -> bool:
        """Whether one more request (and one more token) would pass this check now."""
        used = self.used(check, now)
        if used is None:
            return True  # nothing counted here yet; admission seeds it and decides exactly
        return used + 1 <= self._limit(check)
