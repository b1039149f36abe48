"""When an attempt may be repeated on another key, how long to wait first, and how many retries a provider
may take in all.

Retryable (on another key; docs/reliability-plan.md §2.2): connect errors, timeouts before the first byte,
408, 409, 429, 500, 502, 503, 504, 529, and an error event arriving as the first event of a 200 stream. Also a
key the provider refused (401, 402, 403): the request is fine, the pooled key is not, and the key is marked
invalid so it is not tried again (``retry_on_key_rejected``). Never 400, 404, 413 or 422, which would fail the
same way on every key (LiteLLM retried 404 "model not found" three times, #1418). Never once a byte of the answer
reached the client: AI calls cost money and a client cannot un-read a half answer.

Backoff is "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): the n-th retry waits a
uniform draw from [0, min(max_delay, base_delay * 2**(n-1))], so retries of many requests spread out instead of
arriving together. The caller bounds it by the request's own deadline.

:class:`RetryBudget` is a token bucket per provider in the manner of Finagle's RetryBudget: every first attempt
deposits ``ratio`` of a retry, the bucket also refills at ``floor_per_second`` so a quiet gateway can still
retry, and it holds at most ``burst``. A retry withdraws one whole token or is refused, so during an outage
upstream calls stay within (1 + ratio) times the client requests plus the floor, instead of multiplying by the
retry count (docs/reliability-plan.md F-07: 1.2x plus 3/s).

Pure code: time is ``now`` (``trio.current_time()``), randomness an injected ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trioproxy.balancer.health import KEY_REJECTED_STATUSES, AttemptKind, AttemptResult

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
NEVER_RETRY_STATUSES = frozenset({400, 404, 413, 422})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: float = 0.5  # the OpenAI SDK's initial retry delay
    max_delay: float = 8.0
    retry_on_key_rejected: bool = True
    budget_ratio: float = 0.2  # retries may add this share on top of first attempts
    budget_floor_per_second: float = 3.0
    budget_burst: float = 10.0


DEFAULT_RETRY_POLICY = RetryPolicy()


def is_retryable(
    result: AttemptResult, *, committed: bool, policy: RetryPolicy = DEFAULT_RETRY_POLICY
) -> bool:
    """May the request be tried again on another key after this attempt?

    ``committed``: some byte of the answer (status line included) has reached the client. A timeout counts as
    "before the first byte" exactly when nothing was committed, since the forwarder holds the client's response
    head until the first upstream event.
    """
    if committed:
        return False
    kind = result.kind
    if kind is AttemptKind.OK or kind is AttemptKind.CLIENT_CANCELLED:
        return False
    if kind is not AttemptKind.STATUS:
        return True  # connect error, timeout before the first byte, error as the first stream event
    code = result.status_code
    if code in NEVER_RETRY_STATUSES:
        return False
    if code in KEY_REJECTED_STATUSES:
        return policy.retry_on_key_rejected
    return code in RETRYABLE_STATUSES


def backoff_delay(retry_number: int, rng: random.Random, policy: RetryPolicy = DEFAULT_RETRY_POLICY) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 for the first retry): full jitter."""
    if retry_number < 1:
        return 0.0
    ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** min(retry_number - 1, 60))
    return rng.uniform(0.0, ceiling)


class RetryBudget:
    """Retries one provider may still spend (see the module docs)."""

    __slots__ = ("_balance", "_updated", "policy")

    def __init__(self, policy: RetryPolicy = DEFAULT_RETRY_POLICY, *, now: float) -> None:
        self.policy = policy
        self._balance = policy.budget_burst
        self._updated = now

    def __repr__(self) -> str:
        return f"<RetryBudget balance={self._balance:.2f}>"

    def deposit(self, now: float) -> None:
        """A first attempt was made."""
        self._refill(now)
        self._balance = min(self.policy.budget_burst, self._balance + self.policy.budget_ratio)

    def try_withdraw(self, now: float) -> bool:
        """Take one retry if the budget holds one."""
        self._refill(now)
        if self._balance < 1.0:
            return False
        self._balance -= 1.0
        return True

    def balance(self, now: float) -> float:
        self._refill(now)
        return self._balance

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self._balance = min(
                self.policy.budget_burst, self._balance + elapsed * self.policy.budget_floor_per_second
            )
            self._updated = now
