"""The balancer the forwarder calls: which provider key serves an attempt, and what attempts teach about keys.

One :class:`Balancer` per process holds the health of every provider key (:mod:`.health`), the rotation state
of every pool (:mod:`.strategies`) and a retry budget per provider (:mod:`.retry`). The forwarder's retry loop::

    pick = balancer.pick(gateway_key, snapshot, now=now, exclude=tried)
    balancer.attempt_started(pick.key.id, now=now, retry=bool(tried))   # no await in between
    ...
    balancer.attempt_finished(pick.key.id, result, now=trio.current_time())
    if is_retryable(result, committed=...) and attempts left and balancer.retry_allowed(provider_id, now=...):
        ...pick again with exclude=tried

A pick considers the pool's keys that are enabled, have a weight above zero, belong to the gateway key's
provider and were not tried by this request; of those it lets the strategy choose among the available ones
(ACTIVE, or HALF_OPEN with no trial running, and admitted by the limits layer's ``key_admissible``). A half-open
key is preferred by a request's first attempt so its one trial happens soon (else a key the strategy never
picks would never recover); a retry prefers the ACTIVE keys. When none
is available the pool is never emptied: the key that failed least recently is picked with ``panic=True``
(not-yet-invalid keys first; keys refused by ``key_admissible`` are never panic-picked, their limits are the
admin's). ``None`` means there is nothing to try: no such key, all tried, or all refused by their limits.

The snapshot is the source of truth for which keys exist: state of keys that left it is dropped, new keys start
ACTIVE, and a key that was disabled and enabled again, or got a new secret, starts clean. A change in a pool's
configuration (its keys or their weights) starts its rotation afresh; a retry's pick (``exclude`` not empty)
works on a copy of the rotation, so retries do not skew the pool's distribution.

Every state change is counted in :attr:`Balancer.transitions` (for ``/metrics``), logged, and passed to the
listeners (the Redis sharing in :mod:`.shared_state`). Pure code: time is ``now`` (``trio.current_time()``), the
wall clock (for HTTP dates in rate-limit headers and for sharing) and randomness are injected.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trioproxy.balancer.health import (
    AttemptKind,
    AttemptResult,
    HealthPolicy,
    KeyHealth,
    KeyState,
    Transition,
)
from trioproxy.balancer.ratelimit_headers import cooldown_seconds
from trioproxy.balancer.retry import DEFAULT_RETRY_POLICY, RetryBudget, RetryPolicy
from trioproxy.balancer.strategies import (
    DEFAULT_STRATEGY,
    KeyStats,
    PoolState,
    Strategy,
    make_strategies,
)
from trioproxy.snapshot import GatewayKeyView, ProviderKeyView, Snapshot

logger = logging.getLogger(__name__)

_ACTIVE, _HALF_OPEN, _INVALID = KeyState.ACTIVE, KeyState.HALF_OPEN, KeyState.INVALID
PANIC_LOG_INTERVAL = 10.0  # seconds between two panic warnings for one pool: an outage must not flood the log
_UNSEEN = float("-inf")


@dataclass(frozen=True, slots=True)
class Pick:
    key: ProviderKeyView
    panic: bool  # every usable key of the pool was unavailable; this one failed least recently


class Balancer:
    """Key selection, key health and retry budgets for one process. Not thread-safe (one trio thread)."""

    def __init__(
        self,
        *,
        health_policy: HealthPolicy | None = None,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.health_policy = health_policy or HealthPolicy()
        self.retry_policy = retry_policy
        self._rng = rng if rng is not None else random.Random()
        self._wall_clock = wall_clock
        self._strategies: dict[str, Strategy] = make_strategies(self._rng)
        self._keys: dict[int, KeyHealth] = {}
        self._views: dict[int, ProviderKeyView] = {}
        self._changed_wall: dict[int, float] = {}  # key id -> unix time of its last state change
        self._pools: dict[tuple[int, str], PoolState] = {}
        self._budgets: dict[int, RetryBudget] = {}
        self._snapshot: Snapshot | None = None
        self._last_now = 0.0
        self._panic_logged: dict[int, float] = {}
        self._unknown_strategies: set[str] = set()
        self._listeners: list[Callable[[Transition], None]] = []
        self.transitions: Counter[tuple[str, str]] = Counter()

    def __repr__(self) -> str:
        states = Counter(h.state.value for h in self._keys.values())
        return f"<Balancer keys={len(self._keys)} pools={len(self._pools)} {dict(states)}>"

    # -- the request path ---------------------------------------------------------------------------------------

    def pick(
        self,
        gateway_key: GatewayKeyView,
        snapshot: Snapshot,
        *,
        now: float,
        exclude: frozenset[int] = frozenset(),
        key_admissible: Callable[[int], bool] | None = None,
    ) -> Pick | None:
        """The provider key for the next attempt of a request on ``gateway_key`` (see the module docs)."""
        self._observe(snapshot, now)
        views = snapshot.provider_keys
        strategy = self._strategy(gateway_key.strategy)
        wants_window = strategy.name == "health_best"
        provider_id = gateway_key.provider_id
        healths = self._keys
        candidates: list[KeyStats] = []
        trial: int | None = None
        fallback: list[tuple[bool, float, int, int]] = []  # (invalid, last failure, position, key id)
        # The hot loop of the request path: plain attribute reads, no calls for keys with nothing pending.
        for position, key_id in enumerate(gateway_key.pool):
            if key_id in exclude:
                continue
            view = views.get(key_id)
            if view is None or not view.enabled or view.weight <= 0 or view.provider_id != provider_id:
                continue
            health = healths.get(key_id)
            if health is None:
                health = self._health(key_id, now)
            elif health.deadline is not None or health.trial_in_flight:
                self._refresh(health, now)
            state = health.state
            if not (state is _ACTIVE or (state is _HALF_OPEN and not health.trial_in_flight)):
                last = health.last_failure_at if health.last_failure_at is not None else _UNSEEN
                fallback.append((state is _INVALID, last, position, key_id))
                continue
            if key_admissible is not None and not key_admissible(key_id):
                continue
            if state is _HALF_OPEN and trial is None:
                trial = key_id
            ok, failed = health.window_counts(now) if wants_window else (0, 0)
            candidates.append(
                KeyStats(key_id, position, view.weight, health.in_flight, health.ewma_latency, ok, failed)
            )
        if candidates:
            if trial is not None:
                if not exclude:
                    return Pick(views[trial], panic=False)
                # A retry is a request that already failed once: it goes to a proven key when there is one.
                proven = [c for c in candidates if healths[c.key_id].state is _ACTIVE]
                candidates = proven or candidates
            rotation = self._pool_state(gateway_key, strategy.name, views)
            chosen = strategy.pick(candidates, rotation.copy() if exclude else rotation)
            return Pick(views[chosen], panic=False)
        fallback.sort()
        for _, _, _, key_id in fallback:
            if key_admissible is None or key_admissible(key_id):
                self._log_panic(gateway_key, views[key_id], now)
                return Pick(views[key_id], panic=True)
        return None

    def attempt_started(self, key_id: int, *, now: float, retry: bool = False) -> None:
        """An attempt on ``key_id`` begins; a first attempt (``retry=False``) also feeds the retry budget."""
        self._last_now = now
        self._health(key_id, now).started(now)
        view = self._views.get(key_id)
        if not retry and view is not None:
            self._budget(view.provider_id, now).deposit(now)

    def attempt_finished(self, key_id: int, result: AttemptResult, *, now: float) -> None:
        """How the attempt on ``key_id`` ended. ``result.latency`` of a success is the time to the response head."""
        self._last_now = now
        health = self._keys.get(key_id)
        if health is None:
            return  # the key left the configuration while the attempt ran
        self._refresh(health, now)
        cooldown = None
        if result.kind is AttemptKind.STATUS and result.status_code == 429:
            cooldown = cooldown_seconds(result.headers, result.body_prefix, wall_now=self._wall_clock())
        self._emit(health.finished(result, now, cooldown=cooldown))

    def retry_allowed(self, provider_id: int, *, now: float) -> bool:
        """Take one retry from the provider's budget; False when an outage has spent it."""
        return self._budget(provider_id, now).try_withdraw(now)

    # -- commands (admin API, active checks) --------------------------------------------------------------------

    def reset_key(self, key_id: int, *, now: float | None = None, reason: str = "reset by an admin") -> None:
        when = self._when(now)
        self._emit(self._health(key_id, when).reset(when, reason))

    def mark_valid(
        self, key_id: int, *, now: float | None = None, reason: str = "key test succeeded"
    ) -> None:
        when = self._when(now)
        self._emit(self._health(key_id, when).mark_valid(when, reason))

    def mark_invalid(self, key_id: int, reason: str, *, now: float | None = None) -> None:
        when = self._when(now)
        self._emit(self._health(key_id, when).mark_invalid(when, reason))

    def note_error(self, key_id: int, detail: str, *, now: float | None = None) -> None:
        """Record an error that moves no state (an inconclusive key test), for the status page."""
        when = self._when(now)
        self._health(key_id, when).note_error(when, detail)

    def apply_remote(
        self,
        key_id: int,
        state: KeyState,
        *,
        deadline_in: float | None,
        reason: str,
        changed_at: float,
        ejections: int,
        now: float,
    ) -> bool:
        """Adopt a state another instance published, if it is newer than what this one knows about the key.

        ``deadline_in``: seconds from now; ``changed_at``: unix time of the remote change. Keys this process does
        not know (not in its snapshot yet) are skipped. Returns whether the state was adopted.
        """
        if key_id not in self._views or changed_at <= self._changed_wall.get(key_id, _UNSEEN):
            return False
        health = self._health(key_id, now)
        deadline = None if deadline_in is None else now + max(0.0, deadline_in)
        transition = health.force(
            state, now=now, deadline=deadline, reason=reason, ejections=ejections, remote=True
        )
        self._changed_wall[key_id] = changed_at
        self._emit(transition)
        self._refresh(health, now)
        return True

    def follow(self, snapshot: Snapshot, *, now: float) -> None:
        """Take in ``snapshot``'s keys now rather than at the next pick: a state shared by another process is
        adopted only for keys this balancer knows. Cheap when the snapshot is the one it follows already."""
        self._observe(snapshot, now)

    def subscribe(self, listener: Callable[[Transition], None]) -> None:
        """Call ``listener`` with every state change, local and remote (``Transition.remote``)."""
        self._listeners.append(listener)

    # -- reading ------------------------------------------------------------------------------------------------

    def key_health(self, key_id: int) -> KeyHealth | None:
        return self._keys.get(key_id)

    def key_ids(self) -> list[int]:
        """The provider keys of the latest snapshot seen."""
        return list(self._views)

    def changed_at(self, key_id: int) -> float | None:
        """Unix time of the key's last state change known here (local or remote)."""
        return self._changed_wall.get(key_id)

    def keys_to_check(self, snapshot: Snapshot, *, now: float, idle_after: float) -> list[int]:
        """Enabled keys an active check may look at: ejected, half-open or invalid ones, and keys idle for
        ``idle_after`` seconds or never used. Keys cooling down are left alone."""
        self._observe(snapshot, now)
        due: list[int] = []
        for key_id, view in snapshot.provider_keys.items():
            if not view.enabled:
                continue
            health = self._health(key_id, now)
            if health.state in (KeyState.EJECTED, KeyState.HALF_OPEN, KeyState.INVALID):
                due.append(key_id)
            elif health.state is KeyState.ACTIVE and health.in_flight == 0:
                last = health.last_attempt_at
                if last is None or now - last >= idle_after:
                    due.append(key_id)
        return due

    def status(self, snapshot: Snapshot, *, now: float) -> list[dict[str, Any]]:
        """Every pool with its strategy and every key with its state and counters, ready for JSON. Times are
        seconds relative to ``now`` (deadlines ahead, past events ago); latencies are in milliseconds."""
        self._observe(snapshot, now)
        pools: list[dict[str, Any]] = []
        for gateway_key in sorted(snapshot.gateway_keys.values(), key=lambda g: g.id):
            keys: list[dict[str, Any]] = []
            usable = available = 0
            for position, key_id in enumerate(gateway_key.pool):
                view = snapshot.provider_keys.get(key_id)
                if view is None:
                    continue
                health = self._health(key_id, now)
                if view.enabled and view.weight > 0 and view.provider_id == gateway_key.provider_id:
                    usable += 1
                    available += health.available()
                keys.append(self._key_status(view, health, position, now))
            provider = snapshot.providers.get(gateway_key.provider_id)
            budget = self._budgets.get(gateway_key.provider_id)
            pools.append(
                {
                    "gateway_key_id": gateway_key.id,
                    "gateway_key_name": gateway_key.name,
                    "gateway_key_prefix": gateway_key.prefix,
                    "enabled": gateway_key.enabled,
                    "provider_id": gateway_key.provider_id,
                    "provider_name": provider.name if provider is not None else None,
                    "strategy": gateway_key.strategy,
                    "effective_strategy": self._strategy(gateway_key.strategy).name,
                    "retry_count": gateway_key.retry_count,
                    "usable_keys": usable,
                    "available_keys": available,
                    "panic": usable > 0 and available == 0,
                    "retry_budget": round(budget.balance(now), 2) if budget is not None else None,
                    "keys": keys,
                }
            )
        return pools

    def _key_status(
        self, view: ProviderKeyView, health: KeyHealth, position: int, now: float
    ) -> dict[str, Any]:
        ok, failed = health.window_counts(now)
        return {
            "id": view.id,
            "name": view.name,
            "position": position,
            "enabled": view.enabled,
            "weight": view.weight,
            "state": health.state.value,
            "reason": health.reason,
            "available": health.available(),
            "in_flight": health.in_flight,
            "trial_in_flight": health.trial_in_flight,
            "ewma_latency_ms": _ms(health.ewma_latency),
            "success_rate": round(ok / (ok + failed), 4) if ok + failed else None,
            "window_ok": ok,
            "window_failed": failed,
            "consecutive_failures": health.consecutive_failures,
            "ejections": health.ejections,
            "deadline_in": _ago(health.deadline, now, ahead=True),
            "last_error": health.last_error,
            "last_error_ago": _ago(health.last_error_at, now),
            "last_used_ago": _ago(health.last_attempt_at, now),
            "state_changes": health.transitions,
        }

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def _observe(self, snapshot: Snapshot, now: float) -> None:
        """Follow a new snapshot: drop vanished keys and pools, reset re-enabled or re-keyed keys."""
        self._last_now = now
        if snapshot is self._snapshot:
            return
        self._snapshot = snapshot
        keys = snapshot.provider_keys
        for key_id in [k for k in self._views if k not in keys]:
            self._views.pop(key_id, None)
            self._keys.pop(key_id, None)
            self._changed_wall.pop(key_id, None)
        for key_id in [k for k in self._keys if k not in keys]:
            self._keys.pop(key_id, None)
        for key_id, view in keys.items():
            old = self._views.get(key_id)
            self._views[key_id] = view
            health = self._keys.get(key_id)
            if old is None or health is None:
                continue
            if view.enabled and not old.enabled:
                self._emit(health.reset(now, "re-enabled"))
            elif view.secret != old.secret:
                self._emit(health.reset(now, "new secret"))
        # A pool whose keys or weights changed starts its rotation afresh; a gone pool is forgotten.
        configs = {g.id: _pool_config(g, keys) for g in snapshot.gateway_keys.values()}
        for pool, state in list(self._pools.items()):
            if configs.get(pool[0]) != state.config:
                del self._pools[pool]
        for gateway_key_id in [g for g in self._panic_logged if g not in configs]:
            del self._panic_logged[gateway_key_id]
        for provider_id in [p for p in self._budgets if p not in snapshot.providers]:
            del self._budgets[provider_id]

    def _health(self, key_id: int, now: float) -> KeyHealth:
        health = self._keys.get(key_id)
        if health is None:
            health = self._keys[key_id] = KeyHealth(key_id, self.health_policy, now)
        else:
            self._refresh(health, now)
        return health

    def _refresh(self, health: KeyHealth, now: float) -> None:
        transition = health.refresh(now)
        if transition is not None:
            self._emit(transition)

    def _pool_state(
        self, gateway_key: GatewayKeyView, strategy: str, keys: Mapping[int, ProviderKeyView]
    ) -> PoolState:
        state = self._pools.get((gateway_key.id, strategy))
        if state is None:
            state = PoolState(config=_pool_config(gateway_key, keys))
            self._pools[(gateway_key.id, strategy)] = state
        return state

    def _strategy(self, name: str) -> Strategy:
        strategy = self._strategies.get(name)
        if strategy is not None:
            return strategy
        if name not in self._unknown_strategies:
            self._unknown_strategies.add(name)
            logger.warning("unknown balancing strategy %r: using %s", name, DEFAULT_STRATEGY)
        return self._strategies[DEFAULT_STRATEGY]

    def _budget(self, provider_id: int, now: float) -> RetryBudget:
        budget = self._budgets.get(provider_id)
        if budget is None:
            budget = self._budgets[provider_id] = RetryBudget(self.retry_policy, now=now)
        return budget

    def _when(self, now: float | None) -> float:
        return self._last_now if now is None else now

    def _emit(self, transition: Transition | None) -> None:
        if transition is None:
            return
        self.transitions[(transition.old.value, transition.new.value)] += 1
        if not transition.remote and not transition.timer:  # a deadline running out is no news to share
            self._changed_wall[transition.key_id] = self._wall_clock()
        view = self._views.get(transition.key_id)
        name = view.name if view is not None else "?"
        until = f" for {transition.deadline - transition.at:.1f} s" if transition.deadline is not None else ""
        level = logging.WARNING if transition.new in (KeyState.EJECTED, KeyState.INVALID) else logging.INFO
        logger.log(
            level,
            "provider key %d (%s): %s -> %s%s: %s%s",
            transition.key_id,
            name,
            transition.old.value,
            transition.new.value,
            until,
            transition.reason,
            " (from another instance)" if transition.remote else "",
        )
        for listener in self._listeners:
            listener(transition)

    def _log_panic(self, gateway_key: GatewayKeyView, key: ProviderKeyView, now: float) -> None:
        last = self._panic_logged.get(gateway_key.id)
        if last is not None and now - last < PANIC_LOG_INTERVAL:
            return
        self._panic_logged[gateway_key.id] = now
        logger.warning(
            "gateway key %d (%s): no provider key of its pool is available; panic mode, trying key %d (%s)",
            gateway_key.id,
            gateway_key.prefix,
            key.id,
            key.name,
        )


def _pool_config(
    gateway_key: GatewayKeyView, keys: Mapping[int, ProviderKeyView]
) -> tuple[tuple[int, int], ...]:
    """What a pool's rotation depends on: its keys in order, with their weights (-1: not in the snapshot)."""
    config = []
    for key_id in gateway_key.pool:
        view = keys.get(key_id)
        config.append((key_id, view.weight if view is not None else -1))
    return tuple(config)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _ago(when: float | None, now: float, *, ahead: bool = False) -> float | None:
    if when is None:
        return None
    return round(max(0.0, when - now) if ahead else max(0.0, now - when), 3)
