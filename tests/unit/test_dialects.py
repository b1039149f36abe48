"""Gateway errors in each provider's dialect, checked against the shapes and the official SDKs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from google.genai import errors as genai_errors

from trioproxy.dialects import (
    JSON_CONTENT_TYPE,
    SSE_CONTENT_TYPE,
    anthropic_error_type,
    error_body,
    gemini_error_status,
    openai_error_type,
    stream_error_event,
)
from trioproxy.snapshot import ProviderKind
from trioproxy.sse import SSEFramer
from trioproxy.usage import StreamFormat, UsageMeter

STATUSES = [400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 499, 500, 502, 503, 504, 529]


@pytest.mark.parametrize("status", STATUSES)
def test_openai_shape(status: int) -> None:
    body = json.loads(error_body(ProviderKind.OPENAI, status, "nope", code="model_not_found"))
    assert body == {
        "error": {
            "message": "nope",
            "type": openai_error_type(status),
            "param": None,
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize("status", STATUSES)
def test_anthropic_shape(status: int) -> None:
    body = json.loads(error_body(ProviderKind.ANTHROPIC, status, "nope", code="ignored"))
    assert body == {"type": "error", "error": {"type": anthropic_error_type(status), "message": "nope"}}


@pytest.mark.parametrize("status", STATUSES)
def test_gemini_shape(status: int) -> None:
    body = json.loads(error_body(ProviderKind.GEMINI, status, "nope"))
    assert body == {"error": {"code": status, "message": "nope", "status": gemini_error_status(status)}}


@pytest.mark.parametrize(
    ("status", "openai_type", "anthropic_type", "gemini_status"),
    [
        (400, "invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"),
        (401, "authentication_error", "authentication_error", "UNAUTHENTICATED"),
        (403, "permission_error", "permission_error", "PERMISSION_DENIED"),
        (404, "invalid_request_error", "not_found_error", "NOT_FOUND"),
        (413, "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"),
        (429, "rate_limit_error", "rate_limit_error", "RESOURCE_EXHAUSTED"),
        (500, "server_error", "api_error", "INTERNAL"),
        (502, "server_error", "api_error", "UNAVAILABLE"),
        (503, "server_error", "overloaded_error", "UNAVAILABLE"),
        (504, "server_error", "timeout_error", "DEADLINE_EXCEEDED"),
        (529, "server_error", "overloaded_error", "INTERNAL"),
        (418, "invalid_request_error", "invalid_request_error", "FAILED_PRECONDITION"),
    ],
)
def test_type_tables(status: int, openai_type: str, anthropic_type: str, gemini_status: str) -> None:
    assert openai_error_type(status) == openai_type
    assert anthropic_error_type(status) == anthropic_type
    assert gemini_error_status(status) == gemini_status


def test_bodies_are_compact_ascii_json() -> None:
    body = error_body(ProviderKind.OPENAI, 400, 'caf\u00e9 "quoted" \ud800')
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode()  # compact
    assert body.isascii()
    assert json.loads(body)["error"]["message"] == 'caf\u00e9 "quoted" \ud800'
    assert JSON_CONTENT_TYPE == b"application/json"
    assert SSE_CONTENT_TYPE == b"text/event-stream"


# -- in-band stream errors ------------------------------------------------------------------------------


def single_event(data: bytes) -> Any:
    framer = SSEFramer()
    events = framer.feed(data)
    assert framer.flush() == []
    assert framer.remainder == b""
    assert len(events) == 1
    return events[0]


def test_openai_stream_error() -> None:
    raw = stream_error_event(ProviderKind.OPENAI, StreamFormat.SSE, "upstream broke")
    event = single_event(raw)
    assert event.event is None
    assert json.loads(event.data)["error"]["message"] == "upstream broke"
    assert json.loads(event.data)["error"]["type"] == "server_error"
    assert b"[DONE]" not in raw


def test_anthropic_stream_error() -> None:
    event = single_event(stream_error_event(ProviderKind.ANTHROPIC, StreamFormat.SSE, "upstream broke"))
    assert event.event == "error"
    assert json.loads(event.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream broke"},
    }


def test_gemini_sse_stream_error() -> None:
    event = single_event(stream_error_event(ProviderKind.GEMINI, StreamFormat.SSE, "gone", status=504))
    assert json.loads(event.data) == {
        "error": {"code": 504, "message": "gone", "status": "DEADLINE_EXCEEDED"}
    }


def test_gemini_array_stream_error_continues_or_opens_the_array() -> None:
    element = b'{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":3}}'
    tail = stream_error_event(ProviderKind.GEMINI, StreamFormat.JSON_ARRAY, "gone")
    assert tail.startswith(b",\n{")
    assert not tail.endswith(b"]")
    body = b"[" + element + tail
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)  # truncated on purpose
    parsed = json.loads(body + b"]")
    assert parsed[1]["error"]["status"] == "UNAVAILABLE"

    first = stream_error_event(ProviderKind.GEMINI, StreamFormat.JSON_ARRAY, "gone", first_element=True)
    assert first.startswith(b"[{")
    assert json.loads(first + b"]")[0]["error"]["message"] == "gone"

    meter = UsageMeter(ProviderKind.GEMINI, StreamFormat.JSON_ARRAY)
    meter.feed(body)
    usage = meter.finish()
    assert usage.reported
    assert not usage.complete


def test_whole_json_has_no_in_band_error() -> None:
    with pytest.raises(ValueError, match="error_body"):
        stream_error_event(ProviderKind.OPENAI, StreamFormat.JSON, "x")


# -- the official SDKs read them ------------------------------------------------------------------------


def mock_client(status: int, body: bytes, content_type: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": content_type.decode()})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def anthropic_call(client: httpx2.Client, *, stream: bool = False) -> None:
    sdk = anthropic.Anthropic(
        api_key="test", base_url="http://127.0.0.1:9", http_client=client, max_retries=0
    )
    with sdk:
        if stream:
            for _ in sdk.messages.create(
                model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
        else:
            sdk.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def openai_call(client: httpx2.Client, *, stream: bool = False) -> None:
    sdk = openai.OpenAI(api_key="test", base_url="http://127.0.0.1:9/v1", http_client=client, max_retries=0)
    with sdk:
        if stream:
            for _ in sdk.chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
        else:
            sdk.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (404, anthropic.NotFoundError),
        (429, anthropic.RateLimitError),
        (502, anthropic.InternalServerError),
    ],
)
def test_anthropic_sdk_maps_our_bodies(status: int, error_class: type[anthropic.APIStatusError]) -> None:
    body = error_body(ProviderKind.ANTHROPIC, status, "from the gateway")
    with pytest.raises(error_class) as info:
        anthropic_call(mock_client(status, body, JSON_CONTENT_TYPE))
    assert "from the gateway" in info.value.message


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (429, openai.RateLimitError),
        (504, openai.InternalServerError),
    ],
)
def test_openai_sdk_maps_our_bodies(status: int, error_class: type[openai.APIStatusError]) -> None:
    body = error_body(ProviderKind.OPENAI, status, "from the gateway", code="gateway_error")
    with pytest.raises(error_class) as info:
        openai_call(mock_client(status, body, JSON_CONTENT_TYPE))
    assert info.value.code == "gateway_error"
    assert "from the gateway" in info.value.message


@pytest.mark.parametrize(
    ("kind", "call", "error_class"),
    [
        (ProviderKind.OPENAI, openai_call, openai.APIError),
        (ProviderKind.ANTHROPIC, anthropic_call, anthropic.APIStatusError),
    ],
)
def test_sdks_raise_on_our_stream_error(
    kind: ProviderKind, call: Callable[..., None], error_class: type[Exception]
) -> None:
    body = stream_error_event(kind, StreamFormat.SSE, "upstream broke")
    with pytest.raises(error_class, match="upstream broke"):
        call(mock_client(200, body, SSE_CONTENT_TYPE), stream=True)


@pytest.mark.parametrize(("status", "name"), [(429, "RESOURCE_EXHAUSTED"), (503, "UNAVAILABLE")])
def test_genai_sdk_reads_our_bodies(status: int, name: str) -> None:
    body = json.loads(error_body(ProviderKind.GEMINI, status, "from the gateway"))
    with pytest.raises(genai_errors.APIError) as info:
        genai_errors.APIError.raise_error(status, body, None)
    assert (info.value.code, info.value.status, info.value.message) == (status, name, "from the gateway")
