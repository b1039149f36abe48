"""Spend so far: where a limiter's counters start after a restart (the questions; the database answers them).

A counter (requests or tokens per day, cost per day, a budget's spend in its period) is a cache of the ledger in
the database. When a backend does not hold one yet (the process just started, a new period began, Redis lost
its data) admission asks its :data:`SpendSource` for the sum since the start of the counter's period
(:func:`trioproxy.store.spend.database_spend`, in one read transaction, or the supervisor of a worker group,
which asks the database) and seeds the counter with it.

Pure: no database imports here, so a worker that reaches the database only through its supervisor never loads
SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trioproxy.limits.model import Check, Measure, Scope


@dataclass(frozen=True, slots=True)
class SpendQuery:
    scope: Scope
    subject_id: int
    measure: Measure
    since: float  # unix time: the start of the counter's period


SpendSource = Callable[[Sequence[SpendQuery]], list[int]]
"""Sums for the queries (requests, tokens, nano-dollars), in order. Blocking; raises on database errors."""


def query_for(check: Check) -> SpendQuery:
    since = check.period.start if check.period is not None else 0.0
    return SpendQuery(check.scope, check.subject_id, check.measure, since)


def no_spend(queries: Sequence[SpendQuery]) -> list[int]:
    """A source for a limiter without a database (tests, benchmarks): nothing was spent before."""
    return [0 for _ in queries]
