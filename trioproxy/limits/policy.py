"""What admission does when Redis cannot be reached, and the settings of the limiter (sans-IO).

Two policies, chosen by the operator (``LimitsSettings.on_redis_failure``):

* ``fail_open_local`` (default): each process keeps admitting on an in-process stand-in whose limits are divided
  by N, the number of processes sharing the limits (``instances`` times the workers of each): rates and
  concurrency get ``limit // N``, counters ``spend + (limit - spend) // N`` after seeding the spend so far from
  the database. N processes together stay within every limit (never ``limit`` per process, the failure mode of
  LiteLLM #35533).
* ``fail_closed``: every request that has a limit is refused with 503 until Redis answers again. Requests of
  keys without any limit never touch Redis and are not affected.

The same policy applies to a worker of ``serve --workers N`` whose supervisor, which holds the group's counters
when there is no Redis, does not answer in time.

:class:`RedisHealth` avoids paying Redis' timeout on every request during an outage: after a failure, decisions go
to the policy for ``retry_interval`` seconds before Redis is tried again. Transitions are returned so the caller
logs one line per outage and one per recovery, not one per request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FailurePolicy(enum.StrEnum):
    FAIL_OPEN_LOCAL = "fail_open_local"
    FAIL_CLOSED = "fail_closed"


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """The limiter's process settings; the limits themselves live on keys and users in the database."""

    # Shared limits need Redis; without one, limits hold per process (divided by ``instances``).
    redis_url: str | None = None
    redis_prefix: str = "trioproxy"
    on_redis_failure: FailurePolicy = FailurePolicy.FAIL_OPEN_LOCAL
    # Gateway instances sharing the limits; without Redis each instance holds limit // instances.
    instances: int = 1
    # One decision's deadline. Redis on a LAN answers in well under a millisecond, but one connection carries
    # all of a process's commands in a pipeline, and a busy host adds its scheduling delays: a timeout counts
    # as an outage (the policy applies for redis_retry_interval), so it must not fire on a merely busy Redis.
    redis_timeout: float = 0.5
    # After a Redis failure, how long decisions use the policy before Redis is tried again.
    redis_retry_interval: float = 1.0
    # Summing the spend so far from the database, on first use of a counter.
    seed_timeout: float = 5.0
    # Output tokens the request path reserves for a request that names no max_tokens (estimate_tokens).
    default_output_tokens: int = 4096
    # Settlements waiting for Redis (outage, or in flight); beyond this the oldest are dropped and logged.
    settle_queue_size: int = 10_000

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError("instances must be at least 1")
        FailurePolicy(self.on_redis_failure)


class RedisHealth:
    """Up/down bookkeeping of the shared backend; ``now`` is monotonic time (``trio.current_time()``)."""

    def __init__(self, retry_interval: float) -> None:
        self.retry_interval = retry_interval
        self.down = False
        self.failures = 0
        self._next_try = 0.0

    def __repr__(self) -> str:
        return f"<RedisHealth {'down' if self.down else 'up'} failures={self.failures}>"

    def should_try(self, now: float) -> bool:
        return not self.down or now >= self._next_try

    def failed(self, now: float) -> bool:
        """Record a failure; True when this starts an outage."""
        self.failures += 1
        self._next_try = now + self.retry_interval
        started = not self.down
        self.down = True
        return started

    def succeeded(self) -> bool:
        """Record a success; True when this ends an outage."""
        ended = self.down
        self.down = False
        return ended
