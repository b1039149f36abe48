"""Key-selection strategies: which available provider key of a pool serves the next attempt.

One small interface, :class:`Strategy`: ``pick(candidates, state) -> key id``. The caller (the
:class:`~trioproxy.balancer.balancer.Balancer`) has already removed every key that may not be used right now
(disabled, zero weight, ejected, cooling down, invalid, exhausted by its own limits, already tried by this
request), so a strategy only *orders* the keys it is given. ``candidates`` is never empty and is sorted by
``position`` (the key's index in the gateway key's pool, a stable order). ``state`` is the pool's own
:class:`PoolState`, one per gateway key and strategy, mutated by the pick.

The strategies, by the name stored in ``gateway_keys.strategy``:

``round_robin``
    One cursor per pool (never per path, the origin system's mistake): the next key is the first candidate whose
    position comes after the previously picked one, wrapping around. In every pass of the cursor around the
    pool a key is picked at most once, and a key that stays available for the whole pass exactly once, however
    the other keys come and go meanwhile.
``weighted``
    nginx's smooth weighted round robin (each pick adds every key's weight to its ``current`` and takes the
    largest, which then gives back the total), so 5:1:1 is ``a a b a c a a`` rather than ``a a a a a b c``.
    nginx alone can drift more than one pick from the exact share when many keys have skewed weights (for
    example 100:1:2:3:717:10:3:3:100:1:731:3 lags by 1.46 picks), so the choice is made *earliest deadline
    first* over the keys that may be picked without running ahead by a whole pick, as in Tijdeman's
    "chairman assignment" (1980), with nginx's ``current`` only breaking ties. Then no key is ever a whole pick
    away from its share, at any prefix (the bound is 1 - 1/(2n-2) for n keys), and small pools such as 5:1:1,
    3:2:1, 7:1 or equal weights get exactly nginx's sequence. As in nginx, a key that is unavailable
    for a while keeps its ``current`` frozen and resumes from it, so keys that come and go are neither
    favoured nor starved; the balancer starts a fresh state when the pool's configuration changes.
``health_best``
    Power of two choices (Mitzenmacher) by cost: two distinct random candidates, the cheaper wins, where::

        cost = latency * (in_flight + 1) / success

    ``latency`` is the key's EWMA of time to the response head (keys without a sample yet take the mean of
    the candidates that have one, or 1 s), ``in_flight`` its attempts now running, and ``success`` the
    Laplace-smoothed success rate of its recent window, ``(ok + 1) / (ok + failed + 2)``, so an unknown key
    counts as 50 % rather than perfect or dead. It is Finagle's and Linkerd's "peak EWMA" load, divided by the
    chance that the attempt succeeds: the expected time to a good answer. Sampling two rather than taking the
    minimum keeps a burst of concurrent picks from all landing on the one key that looked best a moment ago.
``least_inflight``
    The fewest attempts in flight; ties go round robin (the shared cursor).
``priority``
    Fill-first tiers: a key's tier is its explicit priority when it has one, else its weight. Only the highest
    tier among the candidates is used; lower tiers take traffic only while every key above them is unavailable.
    Keys of one tier share it round robin.

Zero-weight keys are never candidates, so no strategy can pick them. Pure code: no I/O, no clock; randomness
comes from the ``random.Random`` a strategy is built with, so a seeded generator makes every pick reproducible.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple, Protocol

# Time to the response head assumed for a key with no latency sample when no candidate has one either.
DEFAULT_LATENCY = 1.0


class KeyStats(NamedTuple):
    """A candidate key as a strategy sees it (a named tuple: one is built per key per pick, and a frozen
    dataclass costs three times as much to build)."""

    key_id: int
    position: int  # index in the gateway key's pool; candidates arrive sorted by it
    weight: int  # > 0
    in_flight: int = 0
    ewma_latency: float | None = None  # seconds to the response head; None before the first success
    window_ok: int = 0  # successes in the health window
    window_failed: int = 0  # failures in the health window
    priority: int | None = None  # explicit tier for ``priority``; None: the weight is the tier


@dataclass(slots=True)
class PoolState:
    """What a strategy remembers about one pool between picks."""

    last_position: int = -1  # round robin cursor: position of the last pick
    currents: dict[int, int] = field(default_factory=dict)  # smooth weighted: key id -> current weight
    config: object = None  # the pool configuration this state belongs to (kept by the balancer)

    def copy(self) -> PoolState:
        return PoolState(self.last_position, dict(self.currents), self.config)


class Strategy(Protocol):
    name: str

    def pick(self, candidates: Sequence[KeyStats], state: PoolState) -> int:
        """The id of the chosen candidate; ``candidates`` is non-empty and sorted by position."""
        ...


_POSITION = attrgetter("position")


def _next_after(candidates: Sequence[KeyStats], state: PoolState) -> KeyStats:
    """The first candidate after the cursor (wrapping), and move the cursor to it."""
    index = bisect.bisect_right(candidates, state.last_position, key=_POSITION)
    chosen = candidates[index] if index < len(candidates) else candidates[0]
    state.last_position = chosen.position
    return chosen


class RoundRobin:
    name = "round_robin"

    def pick(self, candidates: Sequence[KeyStats], state: PoolState) -> int:
        return _next_after(candidates, state).key_id


class SmoothWeighted:
    """nginx's smooth weighted round robin, kept within one pick of the exact share (see the module docs)."""

    name = "weighted"

    def pick(self, candidates: Sequence[KeyStats], state: PoolState) -> int:
        currents = state.currents
        total = count = 0
        last_key = -1
        for c in candidates:
            weight = c.weight
            if weight > 0:  # the balancer sends none with weight 0; skipped here all the same
                currents[c.key_id] = currents.get(c.key_id, 0) + weight
                total += weight
                count += 1
                last_key = c.key_id
        if count == 0:
            raise ValueError("smooth weighted selection needs a candidate with a positive weight")
        if count == 1:
            currents[last_key] -= total
            return last_key
        # current = (picks so far + 1) * weight - count * total: the key's lag behind its exact share after this
        # pick, in units of 1/total. With delta = 1 - 1/d, d = 2(n - 1) (Tijdeman's bound), a key may be picked
        # only if it does not then run delta or more ahead (d * current >= total), and among those the one whose
        # lag would first exceed delta if it were passed over (the fewest remaining steps) goes first; ties go
        # to the larger current (nginx's own choice), then to the earlier position.
        d = 2 * (count - 1)
        limit = (d - 1) * total
        best_key: int | None = None
        best_slack = best_current = 0
        for c in candidates:
            weight = c.weight
            if weight <= 0:
                continue
            current = currents[c.key_id]
            if d * current < total:
                continue
            slack = (limit - d * current) // (d * weight)
            if best_key is None or slack < best_slack or (slack == best_slack and current > best_current):
                best_key, best_slack, best_current = c.key_id, slack, current
        if best_key is None:  # only after keys came back with frozen currents: plain nginx meanwhile
            best_key = max((c for c in candidates if c.weight > 0), key=lambda c: currents[c.key_id]).key_id
        currents[best_key] -= total
        return best_key


class HealthBest:
    """Power of two choices by expected time to a good answer (see the module docs for the formula)."""

    name = "health_best"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[KeyStats], state: PoolState) -> int:
        if len(candidates) == 1:
            return candidates[0].key_id
        known = [c.ewma_latency for c in candidates if c.ewma_latency is not None]
        fallback = sum(known) / len(known) if known else DEFAULT_LATENCY
        # Drawn in random order, and a tie goes to the first drawn: equal keys share the load evenly (a tie
        # rule by position would starve the last key of a fresh pool).
        i, j = self._rng.sample(range(len(candidates)), 2)
        first, second = candidates[i], candidates[j]
        return first.key_id if cost(first, fallback) <= cost(second, fallback) else second.key_id


def cost(stats: KeyStats, fallback_latency: float = DEFAULT_LATENCY) -> float:
    """``health_best``'s cost of one key: lower is better."""
    latency = stats.ewma_latency if stats.ewma_latency is not None else fallback_latency
    success = (stats.window_ok + 1) / (stats.window_ok + stats.window_failed + 2)
    return latency * (stats.in_flight + 1) / success


class LeastInflight:
    name = "least_inflight"

    def pick(self, candidates: Sequence[KeyStats], state: PoolState) -> int:
        fewest = min(c.in_flight for c in candidates)
        return _next_after([c for c in candidates if c.in_flight == fewest], state).key_id


class Priority:
    name = "priority"

    def pick(self, candidates: Sequence[KeyStats], state: PoolState) -> int:
        top = max(tier(c) for c in candidates)
        return _next_after([c for c in candidates if tier(c) == top], state).key_id


def tier(stats: KeyStats) -> int:
    return stats.priority if stats.priority is not None else stats.weight


STRATEGY_NAMES = ("round_robin", "weighted", "health_best", "least_inflight", "priority")
DEFAULT_STRATEGY = "round_robin"


def make_strategies(rng: random.Random) -> dict[str, Strategy]:
    """One instance of each strategy, by name; ``health_best`` draws from ``rng``."""
    strategies: list[Strategy] = [
        RoundRobin(),
        SmoothWeighted(),
        HealthBest(rng),
        LeastInflight(),
        Priority(),
    ]
    return {s.name: s for s in strategies}
