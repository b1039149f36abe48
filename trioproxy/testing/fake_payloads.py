"""Pure builders for the fake upstream: response bodies, stream events and error bodies of three providers.

Nothing here does I/O or imports trio: every builder takes the request's facts and returns a
:class:`Reply`, the exact bytes a provider would send (the body, or the list of stream events, one HTTP chunk
each). The server in :mod:`trioproxy.testing.fake_upstream` frames and paces them and applies faults.

The shapes follow the providers' API references and what the official SDKs parse (``openai``, ``anthropic``,
``google.genai``): OpenAI serialises compactly (``separators=(",", ":")``) and pretty-prints error bodies
with four spaces; Anthropic is compact everywhere; Google pretty-prints JSON bodies with two spaces and writes
each SSE event on one line (``": "`` after keys) ended by ``\\r\\n\\r\\n``.

Token counts come from :class:`FakeUsage`, written in the gateway's own convention (``records.Usage``):
``input_tokens`` excludes cached tokens, ``output_tokens`` includes reasoning tokens. Each provider reports
them in its own way:

* OpenAI: ``prompt_tokens = input + cache_read + cache_write``; ``prompt_tokens_details.cached_tokens =
  cache_read`` (and ``cache_write_tokens`` when non-zero); ``completion_tokens = output`` with
  ``completion_tokens_details.reasoning_tokens = reasoning``. The Responses API reports the same numbers as
  ``input_tokens``/``output_tokens`` with ``input_tokens_details``/``output_tokens_details``.
* Anthropic: ``input_tokens = input``, ``cache_read_input_tokens``, ``cache_creation_input_tokens``,
  ``output_tokens = output`` (reasoning is not reported separately).
* Gemini: ``promptTokenCount = input + cache_read`` (Gemini has no cache writes on generateContent, so
  ``cache_write`` is not reported), ``cachedContentTokenCount = cache_read`` only if > 0,
  ``candidatesTokenCount = output - reasoning``, ``thoughtsTokenCount = reasoning`` only if > 0.

The builders of each provider live in :mod:`~trioproxy.testing.fake_openai`,
:mod:`~trioproxy.testing.fake_anthropic` and :mod:`~trioproxy.testing.fake_gemini`; this module holds what
they share (usage convention, framing, errors, ids, headers, embeddings).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

JSONObject = dict[str, Any]

# The deterministic answer: event ``i`` carries word ``i % 5`` ("Hello", " from", ...), so five events spell
# the sentence once and the text is a pure function of the event count.
ANSWER_WORDS = ("Hello", "from", "the", "fake", "upstream")
DEFAULT_EMBEDDING_DIMENSIONS = 16  # small on purpose: the bench measures the gateway, not JSON size

OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-5", "text-embedding-3-small")
ANTHROPIC_MODELS = ("claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-1-20250805")
GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001")
SYSTEM_FINGERPRINT = "fp_fake0upstream"

GEMINI_OVERLOADED = "The model is overloaded. Please try again later."
OPENAI_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"


class Dialect(enum.StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


@dataclass(frozen=True)
class FakeUsage:
    """The tokens the fake reports, in the gateway's convention (see the module docstring for the mapping)."""

    input_tokens: int = 11
    output_tokens: int = 7
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        counts = (
            self.input_tokens,
            self.output_tokens,
            self.cache_read_tokens,
            self.cache_write_tokens,
            self.reasoning_tokens,
        )
        if min(counts) < 0:
            raise ValueError("token counts must be >= 0")
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError("reasoning_tokens are part of output_tokens and cannot exceed them")

    @property
    def openai_prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    @property
    def gemini_prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens


@dataclass(frozen=True, slots=True)
class Call:
    """The facts a builder needs besides the request body: a sequence number for ids, the wall-clock second,
    the answer split into stream deltas, and the usage to report."""

    seq: int
    now: int
    pieces: tuple[str, ...]
    usage: FakeUsage

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(slots=True)
class Reply:
    """One response before framing.

    ``frames`` is ``None`` for a plain body (sent with Content-Length) or the stream's events, each sent as
    its own HTTP chunk. ``inband_error`` holds the frames of the provider's in-band error stream for this
    route, used instead of ``frames`` when a fault asks for it.
    """

    status: int
    content_type: str
    body: bytes = b""
    frames: list[bytes] | None = None
    inband_error: list[bytes] = field(default_factory=list)


def answer_pieces(events: int) -> tuple[str, ...]:
    """The answer as ``events`` text deltas; five of them join to "Hello from the fake upstream"."""
    if events < 1:
        raise ValueError("a stream needs at least one content event")
    return tuple(
        ANSWER_WORDS[i % len(ANSWER_WORDS)] if i == 0 else " " + ANSWER_WORDS[i % len(ANSWER_WORDS)]
        for i in range(events)
    )


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def google_inline(obj: Any) -> bytes:
    """Google's SSE payload style: one line, ``","`` between items and ``": "`` after keys."""
    return json.dumps(obj, separators=(",", ": "), ensure_ascii=False).encode()


def google_pretty(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def data_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def named_event(name: str, payload: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def json_reply(status: int, payload: bytes, content_type: str = "application/json") -> Reply:
    return Reply(status=status, content_type=content_type, body=payload)


# ------------------------------------------------------------------------------------------ errors

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country not supported"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, OPENAI_SERVER_ERROR),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GEMINI_STATUSES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def reason_phrase(status: int) -> str:
    if status == 529:
        return "Overloaded"  # Anthropic's own status; http.HTTPStatus does not know it
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def error_reply(
    dialect: Dialect, status: int, message: str | None = None, *, code: str | None = None, seq: int = 0
) -> Reply:
    """The provider's error body for ``status``; ``message``/``code`` override the usual ones."""
    if dialect is Dialect.OPENAI:
        kind, usual_code, usual_message = _OPENAI_ERRORS.get(
            status,
            ("server_error" if status >= 500 else "invalid_request_error", None, reason_phrase(status)),
        )
        error = {"message": message or usual_message, "type": kind, "param": None, "code": code or usual_code}
        return json_reply(status, json.dumps({"error": error}, indent=4).encode() + b"\n")
    if dialect is Dialect.ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {
            "type": "error",
            "error": {"type": kind, "message": message or reason_phrase(status) or kind},
            "request_id": anthropic_request_id(seq),
        }
        return json_reply(status, compact(body))
    error_obj: JSONObject = {
        "code": status,
        "message": message or reason_phrase(status) or "Error",
        "status": _GEMINI_STATUSES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"),
    }
    if code is not None:
        error_obj["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": code,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return json_reply(status, google_pretty({"error": error_obj}) + b"\n", "application/json; charset=UTF-8")


def unauthorized_reply(dialect: Dialect, *, key_present: bool, seq: int) -> Reply:
    """401 in the provider's words. The key itself is never echoed (providers mask it; we leave it out)."""
    if dialect is Dialect.OPENAI:
        if not key_present:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return error_reply(dialect, 401, message, code=None)
        return error_reply(dialect, 401)
    if dialect is Dialect.ANTHROPIC:
        message = "invalid x-api-key" if key_present else "x-api-key header is required"
        return error_reply(dialect, 401, message, seq=seq)
    # Google itself answers an invalid key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID; the fake
    # answers 401 (one status for every provider) but keeps Google's reason so classifiers can use it.
    return error_reply(
        dialect, 401, "API key not valid. Please pass a valid API key.", code="API_KEY_INVALID"
    )


def not_found_reply(dialect: Dialect, method: str, path: str, *, seq: int) -> Reply:
    if dialect is Dialect.OPENAI:
        return error_reply(dialect, 404, f"Invalid URL ({method} {path})", code=None)
    if dialect is Dialect.ANTHROPIC:
        return error_reply(dialect, 404, "Not Found", seq=seq)
    return error_reply(dialect, 404, f"Method not found: {method} {path}")


def inband_error_frames(dialect: Dialect, *, responses_api: bool = False, sse: bool = True) -> list[bytes]:
    """The frames of a 200 stream that fails at once with the provider's in-band error event."""
    if dialect is Dialect.ANTHROPIC:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return [named_event("error", compact(error))]
    if dialect is Dialect.OPENAI:
        if responses_api:
            event = {
                "type": "error",
                "code": "server_error",
                "message": OPENAI_SERVER_ERROR,
                "param": None,
                "sequence_number": 0,
            }
            return [named_event("error", compact(event))]
        error = {
            "error": {"message": OPENAI_SERVER_ERROR, "type": "server_error", "param": None, "code": None}
        }
        return [data_event(compact(error))]
    gemini_error = {"error": {"code": 503, "message": GEMINI_OVERLOADED, "status": "UNAVAILABLE"}}
    if sse:
        return [b"data: " + google_inline(gemini_error) + b"\r\n\r\n"]
    return [b"[" + google_pretty(gemini_error), b"\n]"]


# ------------------------------------------------------------------------------------------ ids


def anthropic_request_id(seq: int) -> str:
    return f"req_011Fake{seq:016d}"


def request_id(dialect: Dialect, seq: int) -> str:
    if dialect is Dialect.ANTHROPIC:
        return anthropic_request_id(seq)
    return f"req_fake{seq:024x}"


# ------------------------------------------------------------------------------------------ headers

_OPENAI_HEADERS: tuple[tuple[str, str], ...] = (
    ("access-control-expose-headers", "X-Request-ID"),
    ("openai-organization", "fake-org-upstream"),
    ("openai-processing-ms", "1"),
    ("openai-project", "proj_FakeUpstream"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999990"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
    ("cf-cache-status", "DYNAMIC"),
    (
        "set-cookie",
        "__cf_bm=FakeCookieValue0000; path=/; domain=.api.openai.com; HttpOnly; Secure; SameSite=None",
    ),
    ("set-cookie", "_cfuvid=FakeCfuvid0000; path=/; domain=.api.openai.com; HttpOnly; Secure; SameSite=None"),
    ("x-content-type-options", "nosniff"),
    ("server", "cloudflare"),
    ("alt-svc", 'h3=":443"; ma=86400'),
)
_ANTHROPIC_HEADERS: tuple[tuple[str, str], ...] = (
    ("anthropic-ratelimit-requests-limit", "4000"),
    ("anthropic-ratelimit-requests-remaining", "3999"),
    ("anthropic-ratelimit-requests-reset", "2025-01-01T00:00:01Z"),
    ("anthropic-ratelimit-input-tokens-limit", "2000000"),
    ("anthropic-ratelimit-input-tokens-remaining", "2000000"),
    ("anthropic-ratelimit-output-tokens-limit", "400000"),
    ("anthropic-ratelimit-output-tokens-remaining", "400000"),
    ("anthropic-organization-id", "00000000-fake-4000-8000-000000000000"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
    ("via", "1.1 google"),
    ("cf-cache-status", "DYNAMIC"),
    ("x-robots-tag", "none"),
    (
        "set-cookie",
        "_cfuvid=FakeCfuvid0000; path=/; domain=.api.anthropic.com; HttpOnly; Secure; SameSite=None",
    ),
    ("server", "cloudflare"),
)
_GEMINI_HEADERS: tuple[tuple[str, str], ...] = (
    ("vary", "Origin"),
    ("vary", "X-Origin"),
    ("vary", "Referer"),
    ("server", "scaffolding on HTTPServer2"),
    ("x-xss-protection", "0"),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-content-type-options", "nosniff"),
    ("server-timing", "gfet4t7; dur=1"),
    ("alt-svc", 'h3=":443"; ma=2592000,h3-29=":443"; ma=2592000'),
)


def static_headers(dialect: Dialect) -> tuple[tuple[str, str], ...]:
    """The provider's fixed response headers (rate limits, cookies, server, ...)."""
    return {
        Dialect.OPENAI: _OPENAI_HEADERS,
        Dialect.ANTHROPIC: _ANTHROPIC_HEADERS,
        Dialect.GEMINI: _GEMINI_HEADERS,
    }[dialect]


def response_headers(dialect: Dialect, seq: int) -> list[tuple[str, str]]:
    """The provider's per-response headers (request id, cf-ray)."""
    if dialect is Dialect.GEMINI:
        return []
    name = "request-id" if dialect is Dialect.ANTHROPIC else "x-request-id"
    return [(name, request_id(dialect, seq)), ("cf-ray", f"{seq:016x}-SJC")]


def provider_headers(dialect: Dialect, seq: int) -> list[tuple[str, str]]:
    """The provider's usual response headers, the ones a gateway should not pass on to its clients."""
    return [*static_headers(dialect), *response_headers(dialect, seq)]


# ------------------------------------------------------------------------------------------ embeddings


def embedding_vector(key: str, index: int, dimensions: int) -> list[float]:
    """A deterministic vector whose values are k/1024, exact in float32 so base64 and float forms agree."""
    seed = int.from_bytes(hashlib.blake2b(f"{index}:{key}".encode(), digest_size=8).digest(), "little")
    values = []
    for _ in range(dimensions):
        seed = (seed * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        values.append(((seed >> 40) % 2049 - 1024) / 1024)
    return values


def float32_base64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def stream_reply(frames: list[bytes], inband_error: list[bytes]) -> Reply:
    """An SSE stream reply: one HTTP chunk per frame; ``inband_error`` replaces them under the in-band fault."""
    return Reply(200, "text/event-stream; charset=utf-8", frames=frames, inband_error=inband_error)
