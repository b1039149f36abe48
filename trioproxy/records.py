"""One request, as the metering pipeline records it.

The proxy fills a :class:`RequestRecord` while it serves a request and hands it to the metering writer at the end;
the writer owns it from then on. Rejected requests (401, 404, 413, ...) are records too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from decimal import Decimal


class Outcome(enum.StrEnum):
    OK = "ok"
    UPSTREAM_ERROR = "upstream_error"  # the provider answered with an error status
    CLIENT_CANCELLED = "client_cancelled"  # the client left before the answer was complete
    UPSTREAM_DIED = "upstream_died"  # connect failure, timeout, or the stream broke mid-way
    REJECTED = "rejected"  # refused by the gateway itself (auth, route, limits, bad input)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one response, as the provider reported them.

    ``input_tokens`` excludes cached tokens for every provider (Anthropic's convention): OpenAI's and Gemini's
    prompt counts include cache reads, so their extractors subtract them. ``reasoning_tokens`` are part of
    ``output_tokens`` (they are billed as output) and reported separately for visibility.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    reported: bool = False  # the provider sent a usage object at all
    complete: bool = False  # the dialect's terminal marker was seen ([DONE], message_stop, finishReason)
    response_model: str | None = None


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """USD, exact decimals; ``total`` is the sum of the parts."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.output + self.cache_read + self.cache_write


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started_at: float  # unix time
    route: str  # the route's name, e.g. "openai.chat_completions"; "unknown" when nothing matched
    method: str
    path: str  # without the query string (which may carry a key)
    client_ip: str | None
    gateway_key_id: int | None = None
    provider_key_id: int | None = None
    user_id: int | None = None
    provider_id: int | None = None
    provider_kind: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    outcome: Outcome = Outcome.OK
    usage: Usage = field(default_factory=Usage)
    usage_partial: bool = False  # the stream ended before its terminal marker
    # The provider never reported (all of) the usage of a broken-off stream, so the tokens are estimates: the
    # prompt from the request body, the output from the generated text seen (4 characters a token).
    usage_estimated: bool = False
    cost: CostBreakdown | None = None
    price_missing: bool = False  # the model has no price: cost is None, never a silent 0
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    attempts: int = 0
    error: str | None = None  # a short, secret-free reason
    # JSON list of the upstream attempts in order: {"key": provider key id, "status": int | null, "error": str |
    # null, "ms": float}; None when no attempt was made (rejected before the upstream was contacted).
    attempt_log: str | None = None
    panic: bool = (
        False  # every key of the pool was unavailable: the balancer used the least recently failed one
    )
