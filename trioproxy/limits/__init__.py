"""Limits, quotas and budgets that hold under any concurrency, in one process or across many.

What is limited
---------------
* Per gateway key: requests per minute (``rpm_limit``), tokens per minute (``tpm_limit``), requests per day
  (``rpd_limit``), tokens per day (``daily_token_limit``), cost per day (``daily_cost_limit``), a budget
  (``budget``) that resets every ``budget_period`` (daily, weekly, monthly; unset: never), and concurrent
  requests (``max_concurrency``). Allowed models and expiry are checked by the request path before admission.
* Per user: a ``budget`` (and ``budget_period``) across all of the user's gateway keys.
* Per provider key: the provider's own RPM, TPM and RPD. A key at one of them is skipped by the balancer
  (:meth:`Admission.provider_key_admissible`) instead of earning a 429 from the provider.

Reserve, then settle
--------------------
:meth:`Admission.admit` checks every limit that applies and, only if all pass, reserves on all of them at once:
one request on the request counters, the estimated tokens (prompt size plus ``max_tokens``, see
:mod:`~trioproxy.limits.estimate`) on the token counters, the estimated cost on the money counters, a lease on
the concurrency gauge. When the response ends the request path calls :meth:`Admission.settle` with the actual
tokens and cost (partial streams included) or :meth:`Admission.release` when nothing was used. A check passes
when ``used + reserved + this request's estimate <= limit``, atomically with the reservation, so a limit is
never exceeded by reservations, whatever the concurrency; the real usage can exceed a limit only by what the
requests in flight under-estimated (nothing when estimates are upper bounds, e.g. a cost estimate from
``max_tokens``). Request counts stay counted after a release: the attempt was made.

Algorithms (exact, the same in both backends, see :mod:`~trioproxy.limits.model`): rates are an exact sliding
log over 60 s (no fixed-window double bursts, no approximation); per-day and per-period counters are keyed by
UTC period and expire after it; reservations on counters and concurrency leases carry a lease (the request's
deadline plus a margin), so a process that dies mid-request gives its reservations back when they expire.

Backends
--------
* :class:`~trioproxy.limits.local.LocalBackend`: in-process, synchronous, exact for one process (the embedded
  default). With N workers and no Redis, each process gets ``limit // N``.
* :class:`~trioproxy.limits.redis_backend.RedisBackend`: Redis through coredis; one ``EVALSHA`` of a Lua script
  per decision (check and reserve atomically), one per settlement (idempotent), so every instance shares exact
  limits. Each decision has a short deadline; when Redis fails, :mod:`~trioproxy.limits.policy` applies the
  configured policy: ``fail_open_local`` (an in-process stand-in with limits divided by the instance count) or
  ``fail_closed`` (503), logged once per outage and once on recovery.

Spend so far
------------
Budgets and per-day counters survive restarts: a counter a backend does not hold (first use after a start, a new
period, a Redis that lost its data) is seeded from the ``requests`` table (:mod:`~trioproxy.limits.seed`, in a
worker thread) before the decision; in Redis only if the key is still absent (``SET NX``), so concurrent
instances agree. The 60-second rate windows start empty after a restart.

Answers
-------
:class:`~trioproxy.limits.model.Refused` carries the kind, a message, ``retry_after`` and the headers
(``retry-after``, and the gateway key's ``x-ratelimit-limit|remaining|reset-requests`` and ``-tokens``).
:meth:`Refused.status_for(dialect) <trioproxy.limits.model.Refused.status_for>` picks the status: 429 for rates,
quotas and concurrency; for money 402 to Anthropic clients (``billing_error``) and 429 to OpenAI
(``insufficient_quota``, :attr:`~trioproxy.limits.model.Refused.openai_code`) and Gemini
(``RESOURCE_EXHAUSTED``); 403 for an unpriced model on a key with a money limit; 503 when limits cannot be
checked. The request path renders the body with :func:`trioproxy.dialects.error_body`.

Visibility: :meth:`Admission.limit_state` reports window counts, spend today and budget left of a key.
"""

from trioproxy.limits.admission import Admission, find_gateway_key, open_admission
from trioproxy.limits.estimate import TokenEstimate, estimate_cost, estimate_tokens, usage_tokens
from trioproxy.limits.model import (
    AdmissionRequest,
    Admitted,
    RefusalKind,
    Refused,
    Reservation,
    Scope,
)
from trioproxy.limits.policy import FailurePolicy, LimitsSettings
from trioproxy.limits.seed import SpendQuery, SpendSource, no_spend

__all__ = [
    "Admission",
    "AdmissionRequest",
    "Admitted",
    "FailurePolicy",
    "LimitsSettings",
    "RefusalKind",
    "Refused",
    "Reservation",
    "Scope",
    "SpendQuery",
    "SpendSource",
    "TokenEstimate",
    "estimate_cost",
    "estimate_tokens",
    "find_gateway_key",
    "no_spend",
    "open_admission",
    "usage_tokens",
]
