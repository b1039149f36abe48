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

Length: the module is over the house ~600-line mark on purpose. It is flat data, one section per provider, and
keeping the three wire formats side by side is what makes them easy to compare and keep in step.
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


# ------------------------------------------------------------------------------------------ OpenAI


def openai_usage(usage: FakeUsage) -> JSONObject:
    """The ``usage`` object of chat completions and completions."""
    prompt_details: JSONObject = {"cached_tokens": usage.cache_read_tokens, "audio_tokens": 0}
    if usage.cache_write_tokens:
        prompt_details["cache_write_tokens"] = usage.cache_write_tokens
    return {
        "prompt_tokens": usage.openai_prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.openai_prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: JSONObject) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_chat(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/chat/completions``: a chat.completion object, or its chat.completion.chunk stream."""
    cid = f"chatcmpl-Fake{call.seq:020d}"
    if body.get("stream") is not True:
        completion = {
            "id": cid,
            "object": "chat.completion",
            "created": call.now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": call.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": openai_usage(call.usage),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return json_reply(200, compact(completion))
    with_usage = _include_usage(body)

    def chunk(choices: list[JSONObject], usage: JSONObject | None = None) -> bytes:
        obj: JSONObject = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": call.now,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if with_usage:  # with include_usage every chunk carries "usage": null except the last one
            obj["usage"] = usage
        return data_event(compact(obj))

    def choice(delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    frames = [chunk([choice({"role": "assistant", "content": "", "refusal": None})])]
    frames += [chunk([choice({"content": piece})]) for piece in call.pieces]
    frames.append(chunk([choice({}, "stop")]))
    if with_usage:
        frames.append(chunk([], openai_usage(call.usage)))
    frames.append(b"data: [DONE]\n\n")
    return _stream(frames, inband_error_frames(Dialect.OPENAI))


def openai_completions(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/completions`` (legacy): a text_completion object, or its stream."""
    cid = f"cmpl-Fake{call.seq:020d}"

    def completion(choices: list[JSONObject], usage: JSONObject | None, with_usage: bool) -> JSONObject:
        obj: JSONObject = {
            "id": cid,
            "object": "text_completion",
            "created": call.now,
            "model": model,
            "choices": choices,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if with_usage:
            obj["usage"] = usage
        return obj

    def choice(text: str, finish: str | None) -> JSONObject:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if body.get("stream") is not True:
        return json_reply(
            200, compact(completion([choice(call.text, "stop")], openai_usage(call.usage), True))
        )
    with_usage = _include_usage(body)
    frames = [
        data_event(compact(completion([choice(piece, None)], None, with_usage))) for piece in call.pieces
    ]
    frames.append(data_event(compact(completion([choice("", "stop")], None, with_usage))))
    if with_usage:
        frames.append(data_event(compact(completion([], openai_usage(call.usage), True))))
    frames.append(b"data: [DONE]\n\n")
    return _stream(frames, inband_error_frames(Dialect.OPENAI))


def _openai_embedding_inputs(raw: Any) -> list[str] | None:
    """The embedding inputs as keys: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(item, int) for item in raw):
            return [json.dumps(raw)]
        if all(isinstance(item, str | list) for item in raw):
            return [item if isinstance(item, str) else json.dumps(item) for item in raw]
    return None


def openai_embeddings(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/embeddings`` with ``encoding_format`` float (the default) or base64."""
    inputs = _openai_embedding_inputs(body.get("input"))
    if inputs is None:
        return error_reply(Dialect.OPENAI, 400, "'input' must be a string or an array", code=None)
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions < 1:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, key in enumerate(inputs):
        vector = embedding_vector(key, index, dimensions)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": float32_base64(vector) if as_base64 else vector,
            }
        )
    tokens = call.usage.input_tokens
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json_reply(200, compact(payload))


def responses_usage(usage: FakeUsage) -> JSONObject:
    return {
        "input_tokens": usage.openai_prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.openai_prompt_tokens + usage.output_tokens,
    }


def openai_responses(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/responses``: a response object, or the typed event stream ending in response.completed."""
    rid = f"resp_fake{call.seq:040x}"
    item_id = f"msg_fake{call.seq:040x}"
    part_done = {"type": "output_text", "annotations": [], "logprobs": [], "text": call.text}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part_done],
        "role": "assistant",
    }

    def response(status: str, output: list[JSONObject], usage: JSONObject | None) -> JSONObject:
        return {
            "id": rid,
            "object": "response",
            "created_at": call.now,
            "status": status,
            "background": False,
            "completed_at": call.now if status == "completed" else None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": None,
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": None,
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    if body.get("stream") is not True:
        return json_reply(200, compact(response("completed", [item_done], responses_usage(call.usage))))
    events: list[tuple[str, JSONObject]] = [
        ("response.created", {"response": response("in_progress", [], None)}),
        ("response.in_progress", {"response": response("in_progress", [], None)}),
        (
            "response.output_item.added",
            {
                "output_index": 0,
                "item": {
                    "id": item_id,
                    "type": "message",
                    "status": "in_progress",
                    "content": [],
                    "role": "assistant",
                },
            },
        ),
        (
            "response.content_part.added",
            {
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
            },
        ),
    ]
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events += [
        ("response.output_text.delta", {**where, "delta": piece, "logprobs": []}) for piece in call.pieces
    ]
    events += [
        ("response.output_text.done", {**where, "text": call.text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part_done}),
        ("response.output_item.done", {"output_index": 0, "item": item_done}),
        ("response.completed", {"response": response("completed", [item_done], responses_usage(call.usage))}),
    ]
    frames = [
        named_event(name, compact({"type": name, "sequence_number": number, **fields}))
        for number, (name, fields) in enumerate(events)
    ]
    return _stream(frames, inband_error_frames(Dialect.OPENAI, responses_api=True))


def openai_model(model_id: str) -> JSONObject:
    return {"id": model_id, "object": "model", "created": 1686935002, "owned_by": "system"}


def openai_models(model_id: str | None) -> Reply:
    if model_id is not None:
        return json_reply(200, compact(openai_model(model_id)))
    return json_reply(200, compact({"object": "list", "data": [openai_model(m) for m in OPENAI_MODELS]}))


# ------------------------------------------------------------------------------------------ Anthropic


def anthropic_usage(usage: FakeUsage, output_tokens: int) -> JSONObject:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def anthropic_messages(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/messages``: a message object, or its event stream (message_start ... message_stop)."""
    mid = f"msg_01Fake{call.seq:016d}"

    def message(content: list[JSONObject], stop_reason: str | None, output_tokens: int) -> JSONObject:
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": anthropic_usage(call.usage, output_tokens),
        }

    if body.get("stream") is not True:
        text_block = {"type": "text", "text": call.text}
        return json_reply(200, compact(message([text_block], "end_turn", call.usage.output_tokens)))
    usage = call.usage
    final_usage = {  # message_delta's usage is cumulative: the totals of the whole message
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens,
    }
    events: list[tuple[str, JSONObject]] = [
        ("message_start", {"type": "message_start", "message": message([], None, 1)}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
        )
        for piece in call.pieces
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": final_usage,
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    frames = [named_event(name, compact(obj)) for name, obj in events]
    return _stream(frames, inband_error_frames(Dialect.ANTHROPIC))


def anthropic_count_tokens(call: Call) -> Reply:
    return json_reply(200, compact({"input_tokens": call.usage.input_tokens}))


def anthropic_model(model_id: str) -> JSONObject:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id.rsplit("-", 1)[0].replace("-", " ").title(),
        "created_at": "2025-09-29T00:00:00Z",
    }


def anthropic_models(model_id: str | None) -> Reply:
    if model_id is not None:
        return json_reply(200, compact(anthropic_model(model_id)))
    page = {
        "data": [anthropic_model(m) for m in ANTHROPIC_MODELS],
        "has_more": False,
        "first_id": ANTHROPIC_MODELS[0],
        "last_id": ANTHROPIC_MODELS[-1],
    }
    return json_reply(200, compact(page))


# ------------------------------------------------------------------------------------------ Gemini


def gemini_usage(usage: FakeUsage, *, final: bool) -> JSONObject:
    """usageMetadata; chunks before the last carry only the prompt side, as Gemini's early chunks do."""
    prompt = usage.gemini_prompt_tokens
    meta: JSONObject = {"promptTokenCount": prompt}
    candidates = usage.output_tokens - usage.reasoning_tokens
    if final:
        meta["candidatesTokenCount"] = candidates
    meta["totalTokenCount"] = prompt + (candidates + usage.reasoning_tokens if final else 0)
    if usage.cache_read_tokens:
        meta["cachedContentTokenCount"] = usage.cache_read_tokens
    meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if final and usage.reasoning_tokens:
        meta["thoughtsTokenCount"] = usage.reasoning_tokens
    return meta


def gemini_generate(call: Call, model: str, *, stream: bool, sse: bool) -> Reply:
    """``:generateContent`` / ``:streamGenerateContent`` (SSE with ``alt=sse``, else a JSON array stream)."""
    response_id = f"Fake{call.seq:020d}"

    def response(text: str, finish: bool) -> JSONObject:
        candidate: JSONObject = {"content": {"parts": [{"text": text}], "role": "model"}}
        if finish:
            candidate["finishReason"] = "STOP"
        candidate["index"] = 0
        return {
            "candidates": [candidate],
            "usageMetadata": gemini_usage(call.usage, final=finish),
            "modelVersion": model,
            "responseId": response_id,
        }

    json_type = "application/json; charset=UTF-8"
    if not stream:
        return json_reply(200, google_pretty(response(call.text, True)) + b"\n", json_type)
    last = len(call.pieces) - 1
    objects = [response(piece, i == last) for i, piece in enumerate(call.pieces)]
    if sse:
        frames = [b"data: " + google_inline(obj) + b"\r\n\r\n" for obj in objects]
        return Reply(
            200, "text/event-stream", frames=frames, inband_error=inband_error_frames(Dialect.GEMINI)
        )
    frames = [(b"[" if i == 0 else b"\n,\r\n") + google_pretty(obj) for i, obj in enumerate(objects)]
    frames.append(b"\n]")
    return Reply(200, json_type, frames=frames, inband_error=inband_error_frames(Dialect.GEMINI, sse=False))


def gemini_count_tokens(call: Call) -> Reply:
    count: JSONObject = {"totalTokens": call.usage.gemini_prompt_tokens}
    if call.usage.cache_read_tokens:
        count["cachedContentTokenCount"] = call.usage.cache_read_tokens
    count["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": call.usage.gemini_prompt_tokens}]
    return json_reply(200, google_pretty(count) + b"\n", "application/json; charset=UTF-8")


def _gemini_dimensions(request: JSONObject) -> int:
    dimensions = request.get("outputDimensionality")
    return dimensions if isinstance(dimensions, int) and dimensions > 0 else DEFAULT_EMBEDDING_DIMENSIONS


def gemini_embed(body: JSONObject, *, batch: bool) -> Reply:
    """``:embedContent`` ({embedding: {values}}) or ``:batchEmbedContents`` ({embeddings: [...]})."""
    json_type = "application/json; charset=UTF-8"
    if not batch:
        values = embedding_vector(compact(body.get("content")).decode(), 0, _gemini_dimensions(body))
        return json_reply(200, google_pretty({"embedding": {"values": values}}) + b"\n", json_type)
    requests = body.get("requests")
    if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
        return error_reply(Dialect.GEMINI, 400, "Invalid JSON payload: 'requests' must be a list.")
    embeddings = [
        {"values": embedding_vector(compact(r.get("content")).decode(), i, _gemini_dimensions(r))}
        for i, r in enumerate(requests)
    ]
    return json_reply(200, google_pretty({"embeddings": embeddings}) + b"\n", json_type)


def gemini_model(name: str) -> JSONObject:
    embedding = "embedding" in name
    methods = (
        ["embedContent", "countTextTokens", "countTokens"]
        if embedding
        else [
            "generateContent",
            "countTokens",
            "createCachedContent",
            "batchGenerateContent",
        ]
    )
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name.replace("-", " ").title(),
        "description": f"{name} served by the fake upstream",
        "inputTokenLimit": 2048 if embedding else 1048576,
        "outputTokenLimit": 1 if embedding else 65536,
        "supportedGenerationMethods": methods,
    }


def gemini_models(name: str | None) -> Reply:
    json_type = "application/json; charset=UTF-8"
    if name is not None:
        return json_reply(200, google_pretty(gemini_model(name)) + b"\n", json_type)
    return json_reply(
        200, google_pretty({"models": [gemini_model(m) for m in GEMINI_MODELS]}) + b"\n", json_type
    )


def _stream(frames: list[bytes], inband_error: list[bytes]) -> Reply:
    return Reply(200, "text/event-stream; charset=utf-8", frames=frames, inband_error=inband_error)
