"""The limiter's vocabulary, and the pure decisions both backends share (sans-IO: no trio, no Redis).

:func:`build_plan` turns an :class:`AdmissionRequest` into a :class:`Plan`: one :class:`Check` per configured
limit, each naming a logical counter key, its limit, and what this request reserves on it. A backend executes a
plan atomically and answers with one :class:`CheckResult` per check (or :class:`NeedsSeed`); :func:`decide`
turns that answer into :class:`Admitted` or :class:`Refused` with the headers and the Retry-After. Keeping the
plan and the verdict here means the in-process and the Redis backend cannot drift apart in meaning.

Units: requests and tokens are integers; money is an integer of nano-dollars (USD 1e-9), rounded *up* from the
exact decimals, so a counter never under-counts a cost. Counters stay below 2**53, where Redis' Lua numbers
(doubles) are still exact: about USD 9 million per counter.

Windows and periods: a rate is an exact sliding window of 60 s (an entry at time t counts while
``now - t < 60``). Day counters follow the UTC day; budget periods are UTC calendar periods (day, week from
Monday, month from the 1st), or the whole lifetime when the period is unset.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

from trioproxy.snapshot import GatewayKeyView, ProviderKeyView, ProviderKind, UserLimitsView

NANO_PER_USD = 10**9
RATE_WINDOW = 60.0  # seconds: RPM and TPM
DAY = 86_400.0
# A reservation's lease outlives the request it covers: the request's total deadline (600 s by default)
# plus a margin. A process that dies leaves leases behind; they expire after this long.
DEFAULT_LEASE_SECONDS = 660.0
# Extra lifetime of Redis keys past the moment their content stops mattering (clock skew, late settles).
KEY_GRACE = 60


def usd_to_nano(value: Decimal) -> int:
    """USD as nano-dollars, rounded up (a cost is never under-counted)."""
    return int((Decimal(value) * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(value: int) -> Decimal:
    return Decimal(value).scaleb(-9)


class BudgetPeriod(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


def parse_period(value: str | None) -> BudgetPeriod | None:
    """The stored ``budget_period``; None (and, strictest, anything unknown) is a budget that never resets."""
    if value is None:
        return None
    try:
        return BudgetPeriod(value.strip().lower())
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar period: its id is part of the counter's key, so a new period starts a new counter."""

    id: str
    start: float  # unix time
    end: float | None  # None: never ends


def day_period(now: float) -> Period:
    day = math.floor(now / DAY)
    return Period(f"d{day}", day * DAY, (day + 1) * DAY)


def current_period(period: BudgetPeriod | None, now: float) -> Period:
    if period is None:
        return Period("all", 0.0, None)
    if period is BudgetPeriod.DAILY:
        return day_period(now)
    if period is BudgetPeriod.WEEKLY:
        day = math.floor(now / DAY)
        monday = day - (day + 3) % 7  # 1970-01-01 was a Thursday
        return Period(f"w{monday}", monday * DAY, (monday + 7) * DAY)
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    start = dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC)
    end = dt.datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=dt.UTC)
    return Period(f"m{moment.year}{moment.month:02d}", start.timestamp(), end.timestamp())


class CheckKind(enum.StrEnum):
    WINDOW = "W"  # sliding log over RATE_WINDOW seconds
    COUNTER = "C"  # a per-period total with leased reservations
    GAUGE = "G"  # concurrent leases


class Measure(enum.StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    COST = "cost"  # nano-dollars


class Scope(enum.StrEnum):
    GATEWAY_KEY = "gateway_key"
    USER = "user"
    PROVIDER_KEY = "provider_key"


class RefusalKind(enum.StrEnum):
    RATE = "rate"  # RPM / TPM
    QUOTA = "quota"  # requests or tokens per day
    BUDGET = "budget"  # money: cost per day, budgets
    CONCURRENCY = "concurrency"
    TOO_LARGE = "too_large"  # the request alone is bigger than the limit: waiting will not help
    UNPRICED = "unpriced"  # a money limit applies but the model has no price
    UNAVAILABLE = "unavailable"  # the shared backend is unreachable and the policy is fail_closed


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # rpm, tpm, rpd, daily_tokens, daily_cost, budget, concurrency
    kind: CheckKind
    scope: Scope
    subject_id: int
    key: str  # logical counter key, without the backend's prefix
    limit: int
    amount: int  # what this request reserves (1 for request counts and leases)
    measure: Measure
    settles: bool  # the reservation is replaced by the actual usage at settle
    refusal: RefusalKind
    period: Period | None = None  # COUNTER only

    def member(self, rid: str, amount: int | None = None) -> str:
        """A reservation's entry in a window or a counter's lease set: the amount travels in the name."""
        return f"{rid}:{self.amount if amount is None else amount}"


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What the request path knows when it asks to go ahead. ``now`` is unix time (``time.time()``)."""

    request_id: str
    gateway_key: GatewayKeyView
    now: float
    estimated_tokens: int = 0
    estimated_cost: Decimal | None = None  # None: the model has no price
    model: str | None = None
    user: UserLimitsView | None = None
    provider_key: ProviderKeyView | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS


@dataclass(frozen=True, slots=True)
class Plan:
    rid: str
    now: float
    lease_until: float
    checks: tuple[Check, ...]
    estimated_tokens: int
    estimated_cost_nano: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission holds for one request until :meth:`~trioproxy.limits.admission.Admission.settle`."""

    rid: str
    backend: str  # the name of the backend that holds it: settle goes back there
    now: float
    lease_until: float
    checks: tuple[Check, ...]  # only the ones settle has to visit (settling amounts and leases)
    estimated_tokens: int = 0
    estimated_cost_nano: int = 0


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    used: int  # before this request
    reset_in: float | None = None  # WINDOW: until the window is empty again
    retry_in: float | None = None  # refused: until it would pass (None: not before the period ends)


@dataclass(frozen=True, slots=True)
class NeedsSeed:
    """Counters the backend does not hold yet: seed them from the database, then ask again."""

    indices: tuple[int, ...]


Answer = tuple[CheckResult, ...] | NeedsSeed

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Admitted:
    reservation: Reservation
    headers: Headers = ()  # the gateway key's x-ratelimit-* after this admission


@dataclass(frozen=True, slots=True)
class Refused:
    kind: RefusalKind
    scope: Scope
    limit_name: str  # the check that refused ("rpm", "budget", ...) or "backend"
    message: str
    retry_after: int | None  # seconds; None: waiting will not help (or not before a long period)
    headers: Headers = field(default=())

    def status_for(self, dialect: ProviderKind) -> int:
        """The HTTP status in the client's dialect.

        Money refusals are 402 for Anthropic clients (its ``billing_error``) and 429 for OpenAI (whose own
        exhausted quota is a 429 ``insufficient_quota``) and Gemini (``RESOURCE_EXHAUSTED``). Rates, quotas,
        concurrency and too-large requests are 429 everywhere, an unpriced model on a key with a money limit
        403, an unreachable shared backend under ``fail_closed`` 503.
        """
        if self.kind is RefusalKind.UNAVAILABLE:
            return 503
        if self.kind is RefusalKind.UNPRICED:
            return 403
        if self.kind is RefusalKind.BUDGET and ProviderKind(dialect) is ProviderKind.ANTHROPIC:
            return 402
        return 429

    @property
    def openai_code(self) -> str | None:
        """OpenAI's machine-readable ``error.code`` for the body."""
        if self.kind is RefusalKind.BUDGET:
            return "insufficient_quota"
        if self.kind in (RefusalKind.UNAVAILABLE, RefusalKind.UNPRICED):
            return None
        return "rate_limit_exceeded"


_LABELS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "rpd": "requests per day",
    "daily_tokens": "tokens per day",
    "daily_cost": "cost per day",
    "budget": "budget",
    "concurrency": "concurrent requests",
}
_SCOPE_LABELS = {
    Scope.GATEWAY_KEY: "this API key's",
    Scope.USER: "your account's",
    Scope.PROVIDER_KEY: "the provider key's",
}


def _make(
    name: str,
    kind: CheckKind,
    scope: Scope,
    subject: int,
    limit: int,
    amount: int,
    measure: Measure,
    refusal: RefusalKind,
    period: Period | None = None,
) -> Check:
    prefix = {Scope.GATEWAY_KEY: "gk", Scope.USER: "u", Scope.PROVIDER_KEY: "pk"}[scope]
    suffix = "" if period is None else f":{period.id}"
    return Check(
        name=name,
        kind=kind,
        scope=scope,
        subject_id=subject,
        key=f"{prefix}:{subject}:{name}{suffix}",
        limit=max(0, int(limit)),
        amount=amount,
        measure=measure,
        settles=measure is not Measure.REQUESTS,
        refusal=refusal,
        period=period,
    )


_W, _C, _G = CheckKind.WINDOW, CheckKind.COUNTER, CheckKind.GAUGE
_REQ, _TOK, _USD = Measure.REQUESTS, Measure.TOKENS, Measure.COST


def gateway_key_checks(key: GatewayKeyView, now: float, tokens: int, cost: int) -> list[Check]:
    gk, day = Scope.GATEWAY_KEY, day_period(now)
    out: list[Check] = []
    if key.rpm_limit is not None:
        out.append(_make("rpm", _W, gk, key.id, key.rpm_limit, 1, _REQ, RefusalKind.RATE))
    if key.tpm_limit is not None:
        out.append(_make("tpm", _W, gk, key.id, key.tpm_limit, tokens, _TOK, RefusalKind.RATE))
    if key.rpd_limit is not None:
        out.append(_make("rpd", _C, gk, key.id, key.rpd_limit, 1, _REQ, RefusalKind.QUOTA, day))
    if key.daily_token_limit is not None:
        limit = key.daily_token_limit
        out.append(_make("daily_tokens", _C, gk, key.id, limit, tokens, _TOK, RefusalKind.QUOTA, day))
    if key.daily_cost_limit is not None:
        limit = usd_to_nano(key.daily_cost_limit)
        out.append(_make("daily_cost", _C, gk, key.id, limit, cost, _USD, RefusalKind.BUDGET, day))
    if key.budget is not None:
        period = current_period(parse_period(key.budget_period), now)
        limit = usd_to_nano(key.budget)
        out.append(_make("budget", _C, gk, key.id, limit, cost, _USD, RefusalKind.BUDGET, period))
    if key.max_concurrency is not None:
        limit = key.max_concurrency
        out.append(_make("concurrency", _G, gk, key.id, limit, 1, _REQ, RefusalKind.CONCURRENCY))
    return out


def user_checks(user: UserLimitsView, now: float, cost: int) -> list[Check]:
    period = current_period(parse_period(user.budget_period), now)
    limit = usd_to_nano(user.budget)
    return [_make("budget", _C, Scope.USER, user.id, limit, cost, _USD, RefusalKind.BUDGET, period)]


def provider_key_checks(key: ProviderKeyView, now: float, tokens: int) -> list[Check]:
    pk = Scope.PROVIDER_KEY
    out: list[Check] = []
    if key.rpm_limit is not None:
        out.append(_make("rpm", _W, pk, key.id, key.rpm_limit, 1, _REQ, RefusalKind.RATE))
    if key.tpm_limit is not None:
        out.append(_make("tpm", _W, pk, key.id, key.tpm_limit, tokens, _TOK, RefusalKind.RATE))
    if key.rpd_limit is not None:
        out.append(_make("rpd", _C, pk, key.id, key.rpd_limit, 1, _REQ, RefusalKind.QUOTA, day_period(now)))
    return out


def build_plan(request: AdmissionRequest) -> Plan | Refused:
    """The checks the request must pass, in order: gateway key, user, provider key."""
    now = request.now
    tokens = max(0, int(request.estimated_tokens))
    cost = None if request.estimated_cost is None else max(0, usd_to_nano(request.estimated_cost))
    checks = gateway_key_checks(request.gateway_key, now, tokens, cost or 0)
    if request.user is not None:
        checks += user_checks(request.user, now, cost or 0)
    if request.provider_key is not None:
        checks += provider_key_checks(request.provider_key, now, tokens)
    money = [c for c in checks if c.measure is Measure.COST]
    if money and cost is None:
        # Without a price the spend cannot be counted, so a money limit could not hold: refuse instead.
        return Refused(
            RefusalKind.UNPRICED,
            money[0].scope,
            money[0].name,
            f"the model {request.model!r} has no price, so {_SCOPE_LABELS[money[0].scope]} "
            f"{_LABELS[money[0].name]} cannot be enforced",
            None,
        )
    return Plan(
        rid=request.request_id,
        now=now,
        lease_until=now + request.lease_seconds,
        checks=tuple(checks),
        estimated_tokens=tokens,
        estimated_cost_nano=cost or 0,
    )


def reservation_for(plan: Plan, backend: str) -> Reservation:
    return Reservation(
        rid=plan.rid,
        backend=backend,
        now=plan.now,
        lease_until=plan.lease_until,
        checks=tuple(c for c in plan.checks if c.settles or c.kind is CheckKind.GAUGE),
        estimated_tokens=plan.estimated_tokens,
        estimated_cost_nano=plan.estimated_cost_nano,
    )


def settled_amount(check: Check, actual_tokens: int, actual_cost_nano: int) -> int:
    """What a settling check holds once the request's actual usage is known."""
    if check.measure is Measure.TOKENS:
        return max(0, actual_tokens)
    if check.measure is Measure.COST:
        return max(0, actual_cost_nano)
    return check.amount


def decide(plan: Plan, results: tuple[CheckResult, ...], backend: str) -> Admitted | Refused:
    """The verdict on a backend's answer: admitted when every check passed."""
    headers = rate_headers(plan, results, admitted=all(r.ok for r in results))
    failed = [(check, result) for check, result in zip(plan.checks, results, strict=True) if not result.ok]
    if not failed:
        return Admitted(reservation_for(plan, backend), headers)
    # A provider key's refusal means "pick another key" only when nothing of the client's own is exhausted.
    own = [(c, r) for c, r in failed if c.scope is not Scope.PROVIDER_KEY]
    candidates = own or failed
    waits = [(retry_after_for(plan.now, c, r), c) for c, r in candidates]
    retry_after, check = max(waits, key=lambda item: math.inf if item[0] is None else item[0])
    too_large = check.amount > check.limit
    kind = RefusalKind.TOO_LARGE if too_large and check.kind is CheckKind.WINDOW else check.refusal
    if too_large:
        retry_after = None
    label = _LABELS[check.name]
    unit = "USD" if check.measure is Measure.COST else ""
    limit_text = f"{nano_to_usd(check.limit).normalize():f} {unit}".strip() if unit else str(check.limit)
    if too_large:
        message = (
            f"this request ({_amount_text(check)}) is larger than {_SCOPE_LABELS[check.scope]} limit of "
            f"{limit_text} {label}"
        )
    elif check.name == "budget":
        message = f"{_SCOPE_LABELS[check.scope]} budget of {limit_text} is used up"
    else:
        message = f"{_SCOPE_LABELS[check.scope]} limit of {limit_text} {label} is reached"
    if retry_after is not None:
        message += f"; retry in {retry_after} s"
        headers = ((b"retry-after", str(retry_after).encode()), *headers)
    return Refused(kind, check.scope, check.name, message, retry_after, headers)


def _amount_text(check: Check) -> str:
    if check.measure is Measure.COST:
        return f"about {nano_to_usd(check.amount).normalize():f} USD"
    if check.measure is Measure.TOKENS:
        return f"about {check.amount} tokens"
    return "1 request"


def retry_after_for(now: float, check: Check, result: CheckResult) -> int | None:
    """Whole seconds until the check would pass; None: not within a period (or never)."""
    if result.retry_in is not None:
        wait: float | None = result.retry_in
    elif check.kind is CheckKind.COUNTER and check.period is not None and check.period.end is not None:
        wait = check.period.end - now
    elif check.kind is CheckKind.GAUGE:
        wait = 1.0  # a slot frees when some request ends: unknown, soon
    else:
        wait = None
    return None if wait is None else max(1, math.ceil(wait))


def rate_headers(plan: Plan, results: tuple[CheckResult, ...], *, admitted: bool) -> Headers:
    """OpenAI's ``x-ratelimit-*`` headers for the gateway key: requests (RPM, else RPD), tokens (TPM, else
    tokens per day); ``remaining`` counts this request when it was admitted."""
    by_name = {
        check.name: (check, result)
        for check, result in zip(plan.checks, results, strict=True)
        if check.scope is Scope.GATEWAY_KEY
    }
    out: list[tuple[bytes, bytes]] = []
    for suffix, names in ((b"requests", ("rpm", "rpd")), (b"tokens", ("tpm", "daily_tokens"))):
        found = next((by_name[name] for name in names if name in by_name), None)
        if found is None:
            continue
        check, result = found
        used = result.used + (check.amount if admitted else 0)
        if check.kind is CheckKind.WINDOW:
            reset = RATE_WINDOW if admitted else (result.reset_in or 0.0)
        else:
            end = check.period.end if check.period is not None else None
            reset = 0.0 if end is None else end - plan.now
        out += [
            (b"x-ratelimit-limit-" + suffix, str(check.limit).encode()),
            (b"x-ratelimit-remaining-" + suffix, str(max(0, check.limit - used)).encode()),
            (b"x-ratelimit-reset-" + suffix, format_reset(reset).encode()),
        ]
    return tuple(out)


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI writes its reset headers: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
