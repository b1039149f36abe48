"""Errors in each client's own API dialect (sans-IO).

A client of the gateway talks to it with an official SDK, so an error the gateway itself produces (bad key,
unknown route, upstream gone) must look like one its provider would send: the SDKs map the HTTP status to an
exception class and read the message from the provider's error shape.

* OpenAI: ``{"error":{"message","type","param","code"}}``. OpenAI's own 5xx bodies say ``server_error``.
* Anthropic: ``{"type":"error","error":{"type","message"}}`` with the types from Anthropic's errors page
  (400 invalid_request_error, 401 authentication_error, 402 billing_error, 403 permission_error,
  404 not_found_error, 413 request_too_large, 429 rate_limit_error, 500 api_error, 504 timeout_error,
  529 overloaded_error; other 4xx are invalid_request_error, other 5xx api_error).
* Gemini: ``{"error":{"code","message","status"}}`` with the google.rpc status names.

Messages are passed through as given: callers must not put secrets in them.
"""

from __future__ import annotations

import json

from trioproxy.snapshot import ProviderKind
from trioproxy.usage import StreamFormat

JSON_CONTENT_TYPE = b"application/json"
SSE_CONTENT_TYPE = b"text/event-stream"

_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# google.rpc.Code names by the HTTP status Google's APIs answer them with.
_GEMINI_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",  # gRPC has no "too large" code; Google answers oversized input as 400 anyway
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _dumps(obj: object) -> bytes:
    # ensure_ascii keeps the body valid UTF-8 even for a message with lone surrogates.
    return json.dumps(obj, separators=(",", ":")).encode()


def openai_error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _OPENAI_TYPES.get(status, "invalid_request_error")


def anthropic_error_type(status: int) -> str:
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def gemini_error_status(status: int) -> str:
    if status in _GEMINI_STATUSES:
        return _GEMINI_STATUSES[status]
    return "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"


def _error_object(kind: ProviderKind, status: int, message: str, code: str | None) -> dict[str, object]:
    if kind is ProviderKind.ANTHROPIC:
        return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    if kind is ProviderKind.GEMINI:
        return {"error": {"code": status, "message": message, "status": gemini_error_status(status)}}
    return {"error": {"message": message, "type": openai_error_type(status), "param": None, "code": code}}


def error_body(kind: ProviderKind, status: int, message: str, *, code: str | None = None) -> bytes:
    """A compact JSON error body for an HTTP ``status`` response, in ``kind``'s dialect.

    ``code`` is OpenAI's machine-readable ``error.code`` (e.g. ``"invalid_api_key"``, ``"model_not_found"``);
    the other dialects have no such field and ignore it.
    """
    return _dumps(_error_object(ProviderKind(kind), status, message, code))


def stream_error_event(
    kind: ProviderKind,
    fmt: StreamFormat,
    message: str,
    *,
    status: int = 502,
    first_element: bool = False,
) -> bytes:
    """One in-band error to end a stream that broke after its response head was sent.

    The bytes follow what each SDK recognizes as a stream error: OpenAI ``data: {"error":{...}}`` (never
    followed by ``[DONE]``, so the stream does not look finished), Anthropic ``event: error`` with an
    ``api_error`` (or the type ``status`` maps to), Gemini SSE ``data: {"error":{...}}``.

    For Gemini's JSON array (``StreamFormat.JSON_ARRAY``) the event is one more array element and the closing
    ``]`` is left out on purpose, so the body stays visibly truncated. The caller knows whether the array was
    opened: with ``first_element=True`` (nothing sent yet) the result opens it (``[{...}``), otherwise it
    continues it (``,\\n{...}``). ``first_element`` is ignored for SSE.
    """
    kind = ProviderKind(kind)
    fmt = StreamFormat(fmt)
    if fmt is StreamFormat.JSON:
        raise ValueError("a whole JSON body has no in-band error; answer with error_body() instead")
    body = _dumps(_error_object(kind, status, message, None))
    if fmt is StreamFormat.JSON_ARRAY:
        return (b"[" if first_element else b",\n") + body
    if kind is ProviderKind.ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"
