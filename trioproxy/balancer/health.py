"""The health of one provider key: a state machine fed by the results of real attempts (passive checks).

States (:class:`KeyState`)::

    ACTIVE ──429──────────────────► COOLING_DOWN ──deadline──► ACTIVE
    ACTIVE ──failures──► EJECTED ──deadline──► HALF_OPEN ──trial ok──► ACTIVE
                            ▲                      │
                            └────trial failed──────┘
    any ──401/402/403──► INVALID ──reset / mark_valid / re-enabled / new secret──► ACTIVE

* ``COOLING_DOWN``: a 429 takes the key out until the provider says it may be used again (``Retry-After``, the
  rate-limit reset headers or Gemini's ``RetryInfo``; see :mod:`~trioproxy.balancer.ratelimit_headers`), else
  for ``default_cooldown``. A second 429 never shortens a cooldown (LiteLLM #40130 kept the first deadline).
  Rate limiting is not ill health: a 429 is not counted as a failure.
* ``EJECTED``: ``consecutive_failures`` failures in a row, or an error rate of ``max_error_rate`` or more over
  the last ``window`` seconds once it holds ``min_window_attempts`` results. Failures are 5xx (529 included),
  408, timeouts, connect errors and an error event as the first event of a 200 stream. The ejection lasts
  ``base_ejection * 2**(n-1)`` for the n-th ejection in a row (30 s, 60 s, 120 s, ...) up to ``max_ejection``;
  the count starts again once the key has stayed healthy for ``ejection_memory`` seconds.
* ``HALF_OPEN``: the ejection is over; the next attempt is a trial and no other attempt is sent meanwhile. Its
  result decides: a success (or any answer that proves the key works, a 4xx of the client's own) makes the key
  ``ACTIVE`` with a clean window, a failure ejects it for longer, a 429 cools it down, a cancelled trial lets
  the next attempt try again. A trial whose result never arrives stops blocking after ``trial_timeout``.
* ``INVALID``: the provider refused the key itself (401, 402, 403). Only a person or a check can bring it back.

Results of attempts that started before a transition (a stream that outlives its key's ejection) still update
the counters, but they do not move an ejected, cooling or invalid key.

Pure code: every method takes ``now`` (``trio.current_time()`` seconds) and returns the
:class:`Transition` it made, if any; the caller logs, counts and shares it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

Headers = Sequence[tuple[bytes, bytes]]


class KeyState(enum.StrEnum):
    ACTIVE = "active"
    COOLING_DOWN = "cooling_down"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"
    INVALID = "invalid"


class AttemptKind(enum.StrEnum):
    OK = "ok"
    STATUS = "status"  # the provider answered with an error (or otherwise not-2xx) status
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    STREAM_ERROR_FIRST_EVENT = "stream_error_first_event"  # a 200 stream whose first event was an error
    CLIENT_CANCELLED = "client_cancelled"  # the client left: says nothing about the key


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How one attempt on one key ended. Build it with the class methods."""

    kind: AttemptKind
    latency: float | None = None  # seconds to the response head, for OK
    status_code: int = 0
    headers: Headers = ()
    body_prefix: bytes = b""  # the start of an error body (Gemini puts RetryInfo in it)
    detail: str = ""  # a short, secret-free description for last_error

    @classmethod
    def ok(cls, latency: float) -> AttemptResult:
        return cls(AttemptKind.OK, latency=latency)

    @classmethod
    def status(cls, code: int, headers: Headers = (), body_prefix: bytes = b"") -> AttemptResult:
        return cls(AttemptKind.STATUS, status_code=code, headers=tuple(headers), body_prefix=body_prefix)

    @classmethod
    def timeout(cls, detail: str = "") -> AttemptResult:
        return cls(AttemptKind.TIMEOUT, detail=detail)

    @classmethod
    def connect_error(cls, detail: str = "") -> AttemptResult:
        return cls(AttemptKind.CONNECT_ERROR, detail=detail)

    @classmethod
    def stream_error_first_event(cls, detail: str = "") -> AttemptResult:
        return cls(AttemptKind.STREAM_ERROR_FIRST_EVENT, detail=detail)

    @classmethod
    def client_cancelled(cls) -> AttemptResult:
        return cls(AttemptKind.CLIENT_CANCELLED)

    def describe(self) -> str:
        if self.kind is AttemptKind.STATUS:
            return f"HTTP {self.status_code}"
        if self.detail:
            return f"{self.kind.value}: {self.detail}"
        return self.kind.value


class Verdict(enum.Enum):
    SUCCESS = "success"  # the key works (a 2xx, or a 4xx that is the client's own fault)
    FAILURE = "failure"  # counts toward ejection
    RATE_LIMITED = "rate_limited"
    KEY_REJECTED = "key_rejected"
    NEUTRAL = "neutral"


KEY_REJECTED_STATUSES = frozenset({401, 402, 403})
FAILURE_STATUSES = frozenset({408})  # besides every 5xx


def classify(result: AttemptResult) -> Verdict:
    kind = result.kind
    if kind is AttemptKind.OK:
        return Verdict.SUCCESS
    if kind is AttemptKind.CLIENT_CANCELLED:
        return Verdict.NEUTRAL
    if kind is not AttemptKind.STATUS:
        return Verdict.FAILURE
    code = result.status_code
    if code == 429:
        return Verdict.RATE_LIMITED
    if code in KEY_REJECTED_STATUSES:
        return Verdict.KEY_REJECTED
    if code >= 500 or code in FAILURE_STATUSES:
        return Verdict.FAILURE
    if code == 409:  # a conflict (OpenAI: "try again"): worth a retry, says nothing about the key
        return Verdict.NEUTRAL
    return Verdict.SUCCESS


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """The thresholds of the state machine; the defaults follow docs/reliability-plan.md §2.2."""

    consecutive_failures: int = 5  # Envoy outlier detection's consecutive_5xx
    window: float = 60.0  # LiteLLM judges "this minute's" failures
    window_buckets: int = 6
    min_window_attempts: int = 10  # a first failure alone never ejects (LiteLLM), nor do a few
    max_error_rate: float = 0.5  # LiteLLM's > 50 % of the minute's calls
    base_ejection: float = 30.0  # Envoy base_ejection_time
    max_ejection: float = 900.0
    ejection_memory: float = 900.0  # healthy this long: the next ejection is a first one again
    default_cooldown: float = 5.0  # a 429 without any reset information (LiteLLM's cooldown)
    max_cooldown: float = 3600.0  # a daily quota's reset hours away is re-tried hourly instead
    trial_timeout: float = 600.0
    ewma_alpha: float = 0.3


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change of one key."""

    key_id: int
    old: KeyState
    new: KeyState
    reason: str
    at: float  # trio time
    deadline: float | None  # trio time, for COOLING_DOWN and EJECTED
    ejections: int
    remote: bool = False  # learned from another instance (not to be shared again)
    timer: bool = False  # a deadline ran out: every instance sees this by itself, so it is not shared


class _Window:
    """Successes and failures of the last ``window`` seconds, in buckets."""

    __slots__ = ("_buckets", "_span", "_width")

    def __init__(self, window: float, buckets: int) -> None:
        self._width = window / buckets
        self._span = buckets
        self._buckets: deque[list[int]] = deque()  # [bucket index, ok, failed], oldest first

    def add(self, now: float, *, ok: bool) -> None:
        index = int(now // self._width)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        self._buckets[-1][1 if ok else 2] += 1
        self._expire(index)

    def counts(self, now: float) -> tuple[int, int]:
        self._expire(int(now // self._width))
        ok = failed = 0
        for _, bucket_ok, bucket_failed in self._buckets:
            ok += bucket_ok
            failed += bucket_failed
        return ok, failed

    def clear(self) -> None:
        self._buckets.clear()

    def _expire(self, index: int) -> None:
        while self._buckets and self._buckets[0][0] <= index - self._span:
            self._buckets.popleft()


class KeyHealth:
    """The state and counters of one provider key."""

    __slots__ = (
        "_trial_started",
        "_window",
        "active_since",
        "changed_at",
        "consecutive_failures",
        "deadline",
        "ejections",
        "ewma_latency",
        "in_flight",
        "key_id",
        "last_attempt_at",
        "last_error",
        "last_error_at",
        "last_failure_at",
        "policy",
        "reason",
        "state",
        "total_attempts",
        "transitions",
        "trial_in_flight",
    )

    def __init__(self, key_id: int, policy: HealthPolicy, now: float) -> None:
        self.key_id = key_id
        self.policy = policy
        self.state = KeyState.ACTIVE
        self.reason = "new"
        self.deadline: float | None = None
        self.changed_at = now
        self.active_since = now
        self.in_flight = 0
        self.trial_in_flight = False
        self._trial_started = 0.0
        self.consecutive_failures = 0
        self.ejections = 0
        self.ewma_latency: float | None = None
        self._window = _Window(policy.window, policy.window_buckets)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_failure_at: float | None = None  # any failure, 429 or rejection: orders panic picks
        self.last_attempt_at: float | None = None
        self.total_attempts = 0
        self.transitions = 0

    def __repr__(self) -> str:
        return f"<KeyHealth {self.key_id} {self.state.value} in_flight={self.in_flight}>"

    # -- reading ------------------------------------------------------------------------------------------------

    def refresh(self, now: float) -> Transition | None:
        """Let time pass: an expired cooldown becomes ACTIVE, an expired ejection HALF_OPEN."""
        if self.deadline is None or now < self.deadline:
            if self.trial_in_flight and now - self._trial_started >= self.policy.trial_timeout:
                self.trial_in_flight = False
            return None
        if self.state is KeyState.COOLING_DOWN:
            return self._move(KeyState.ACTIVE, "cooldown over", now, None, timer=True)
        if self.state is KeyState.EJECTED:
            return self._move(
                KeyState.HALF_OPEN, "ejection over: next attempt is a trial", now, None, timer=True
            )
        return None

    def available(self) -> bool:
        """May a new attempt use this key (after :meth:`refresh`)?"""
        return self.state is KeyState.ACTIVE or (
            self.state is KeyState.HALF_OPEN and not self.trial_in_flight
        )

    def window_counts(self, now: float) -> tuple[int, int]:
        return self._window.counts(now)

    def success_rate(self, now: float) -> float | None:
        ok, failed = self._window.counts(now)
        return ok / (ok + failed) if ok + failed else None

    # -- feeding ------------------------------------------------------------------------------------------------

    def started(self, now: float) -> None:
        self.in_flight += 1
        self.total_attempts += 1
        self.last_attempt_at = now
        if self.state is KeyState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            self._trial_started = now

    def finished(
        self, result: AttemptResult, now: float, *, cooldown: float | None = None
    ) -> Transition | None:
        """Feed one result; ``cooldown`` is the provider's own wait for a 429, in seconds, if it gave one."""
        self.in_flight = max(0, self.in_flight - 1)
        verdict = classify(result)
        trial = self.state is KeyState.HALF_OPEN and self.trial_in_flight
        if trial:
            self.trial_in_flight = False
        if verdict is Verdict.NEUTRAL:
            return None
        if verdict is Verdict.SUCCESS:
            return self._success(result, now, trial)
        self.last_error = result.describe()
        self.last_error_at = now
        self.last_failure_at = now
        if verdict is Verdict.KEY_REJECTED:
            if self.state is KeyState.INVALID:
                return None
            return self._move(KeyState.INVALID, f"provider rejected the key ({result.describe()})", now, None)
        if verdict is Verdict.RATE_LIMITED:
            return self._rate_limited(now, cooldown, trial)
        return self._failure(result, now, trial)

    def _success(self, result: AttemptResult, now: float, trial: bool) -> Transition | None:
        if result.latency is not None:
            alpha = self.policy.ewma_alpha
            previous = self.ewma_latency
            self.ewma_latency = (
                result.latency if previous is None else alpha * result.latency + (1 - alpha) * previous
            )
        self._window.add(now, ok=True)
        self.consecutive_failures = 0
        if trial:
            self._window.clear()
            self._window.add(now, ok=True)
            return self._move(KeyState.ACTIVE, "trial request succeeded", now, None)
        return None

    def _rate_limited(self, now: float, cooldown: float | None, trial: bool) -> Transition | None:
        if self.state not in (KeyState.ACTIVE, KeyState.COOLING_DOWN) and not trial:
            return None
        seconds = self.policy.default_cooldown if cooldown is None else cooldown
        deadline = now + min(max(seconds, 0.0), self.policy.max_cooldown)
        if self.state is KeyState.COOLING_DOWN:
            if self.deadline is not None and deadline > self.deadline:
                self.deadline = deadline  # extended silently: still cooling, for longer
            return None
        source = "the provider's reset time" if cooldown is not None else "the default cooldown"
        return self._move(KeyState.COOLING_DOWN, f"rate limited (429) until {source}", now, deadline)

    def _failure(self, result: AttemptResult, now: float, trial: bool) -> Transition | None:
        self._window.add(now, ok=False)
        self.consecutive_failures += 1
        if trial:
            return self._eject(f"trial request failed ({result.describe()})", now)
        if self.state not in (KeyState.ACTIVE, KeyState.COOLING_DOWN):
            return None
        policy = self.policy
        if self.consecutive_failures >= policy.consecutive_failures:
            return self._eject(f"{self.consecutive_failures} failures in a row ({result.describe()})", now)
        ok, failed = self._window.counts(now)
        if ok + failed >= policy.min_window_attempts and failed >= policy.max_error_rate * (ok + failed):
            return self._eject(
                f"{failed} of {ok + failed} attempts failed in {policy.window:g} s ({result.describe()})", now
            )
        return None

    def _eject(self, reason: str, now: float) -> Transition:
        policy = self.policy
        if self.state is not KeyState.HALF_OPEN and now - self.active_since >= policy.ejection_memory:
            self.ejections = 0
        self.ejections += 1
        duration = min(policy.max_ejection, policy.base_ejection * 2.0 ** min(self.ejections - 1, 60))
        return self._move(KeyState.EJECTED, reason, now, now + duration)

    # -- commands -----------------------------------------------------------------------------------------------

    def reset(self, now: float, reason: str) -> Transition | None:
        """Forget everything bad about the key (an admin's reset, a re-enabled key, a new secret)."""
        self.consecutive_failures = 0
        self.ejections = 0
        self._window.clear()
        self.last_error = None
        self.last_error_at = None
        self.last_failure_at = None
        self.trial_in_flight = False
        if self.state is KeyState.ACTIVE:
            self.reason = reason
            return None
        return self._move(KeyState.ACTIVE, reason, now, None)

    def mark_valid(self, now: float, reason: str) -> Transition | None:
        """A successful key test: an invalid, ejected or half-open key is usable again (the ejection count is
        kept, so a key that fails again is ejected for longer). A cooldown stands: a model list that answers says
        nothing about the rate limit."""
        if self.state not in (KeyState.INVALID, KeyState.EJECTED, KeyState.HALF_OPEN):
            return None
        self.consecutive_failures = 0
        self.trial_in_flight = False
        self._window.clear()
        return self._move(KeyState.ACTIVE, reason, now, None)

    def mark_invalid(self, now: float, reason: str) -> Transition | None:
        self.last_error = reason
        self.last_error_at = now
        self.last_failure_at = now
        if self.state is KeyState.INVALID:
            return None
        return self._move(KeyState.INVALID, reason, now, None)

    def note_error(self, now: float, detail: str) -> None:
        """Record an error that changes no state (an inconclusive active check)."""
        self.last_error = detail
        self.last_error_at = now

    def force(
        self,
        state: KeyState,
        *,
        now: float,
        deadline: float | None,
        reason: str,
        ejections: int,
        remote: bool,
    ) -> Transition | None:
        """Adopt a state decided elsewhere (another instance)."""
        self.ejections = ejections
        if state is self.state:
            self.deadline = deadline
            self.reason = reason
            return None
        if state is KeyState.ACTIVE:
            self.consecutive_failures = 0
            self._window.clear()
        self.trial_in_flight = False
        return self._move(state, reason, now, deadline, remote=remote)

    def _move(
        self,
        state: KeyState,
        reason: str,
        now: float,
        deadline: float | None,
        *,
        remote: bool = False,
        timer: bool = False,
    ) -> Transition:
        old = self.state
        if state is KeyState.ACTIVE and old is not KeyState.COOLING_DOWN:
            self.active_since = now
        self.state = state
        self.reason = reason
        self.deadline = deadline
        self.changed_at = now
        self.transitions += 1
        return Transition(self.key_id, old, state, reason, now, deadline, self.ejections, remote, timer)
