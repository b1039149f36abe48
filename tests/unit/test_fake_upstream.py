"""The fake upstream: pure payload builders (hypothesis), raw h11 exchanges over 127.0.0.1 sockets for routes,
auth and every fault mode, and the official SDKs pointed straight at it."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, cast

import anthropic
import h11
import openai
import pytest
import trio
import trustme
from google import genai
from google.genai import types as genai_types
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.testing import (
    CapturedRequest,
    FakeUpstream,
    FakeUsage,
    Fault,
    fake_anthropic,
    fake_gemini,
    fake_openai,
)
from trioproxy.testing import fake_payloads as fp

KEY = "sk-upstream-test"
TEXT = "Hello from the fake upstream"
OPENAI_AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
ANTHROPIC_OVERLOADED = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)
ANTHROPIC_AUTH = [
    ("x-api-key", KEY),
    ("anthropic-version", "2023-06-01"),
    ("content-type", "application/json"),
]
GEMINI_AUTH = [("x-goog-api-key", KEY), ("content-type", "application/json")]
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
GEMINI_SSE = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


# -------------------------------------------------------------------------------- helpers


@dataclass
class Exchange:
    """What a raw h11 client saw: the head, each HTTP chunk with its arrival time, and how it ended."""

    response: h11.Response | None = None
    chunks: list[bytes] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    head_at: float = 0.0
    complete: bool = False
    ended_by: str | None = None  # "eof", "reset" or "timeout" when the body did not complete

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status_code

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def headers(self, name: str) -> list[str]:
        assert self.response is not None
        return [v.decode() for k, v in self.response.headers if k == name.encode()]


async def receive_response(
    stream: trio.abc.Stream, conn: h11.Connection, wait_limit: float = 10.0
) -> Exchange:
    result = Exchange()
    current: bytearray | None = None
    with trio.move_on_after(wait_limit) as scope:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                result.ended_by = "eof"
                return result
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    result.ended_by = "reset"
                    return result
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                result.response = event
                result.head_at = trio.current_time()
            elif isinstance(event, h11.Data):
                if current is None or event.chunk_start:
                    current = bytearray()
                current += event.data
                if event.chunk_end or conn.their_state != h11.SEND_BODY or not _is_chunked(result):
                    result.chunks.append(bytes(current))
                    result.chunk_times.append(trio.current_time())
                    current = None
            elif isinstance(event, h11.EndOfMessage):
                result.complete = True
                return result
            elif isinstance(event, h11.ConnectionClosed):
                result.ended_by = "eof"
                return result
    if scope.cancelled_caught:
        result.ended_by = "timeout"
    return result


def _is_chunked(result: Exchange) -> bool:
    return result.response is not None and any(
        k == b"transfer-encoding" and b"chunked" in v for k, v in result.response.headers
    )


def request_bytes(
    conn: h11.Connection, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
) -> bytes:
    payload = b"" if body is None else body
    all_headers = [("host", "upstream.test"), *headers, ("content-length", str(len(payload)))]
    out = conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
    out += conn.send(h11.Data(data=payload)) or b"" if payload else b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


async def exchange(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: Any = None,
    *,
    wait_limit: float = 10.0,
) -> Exchange:
    """One request on a fresh connection (closed afterwards)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        await stream.send_all(request_bytes(conn, method, target, headers, raw))
        return await receive_response(stream, conn, wait_limit)


async def start(nursery: trio.Nursery, **kwargs: Any) -> tuple[FakeUpstream, int]:
    fake = FakeUpstream(**kwargs)
    port = await nursery.start(fake.serve)
    return fake, port


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body; accepts LF and CRLF line ends."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.decode().split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


async def wait_for_closed(fake: FakeUpstream, count: int = 0) -> None:
    with trio.fail_after(5):
        await fake.wait_for_open_connections(count)


# -------------------------------------------------------------------------------- pure builders

usages = st.builds(
    lambda i, o, cr, cw, r: FakeUsage(i, o, cr, cw, min(r, o)),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)


def make_call(usage: FakeUsage, events: int = 5) -> fp.Call:
    return fp.Call(seq=7, now=1_700_000_000, pieces=fp.answer_pieces(events), usage=usage)


def test_answer_pieces_spell_the_sentence() -> None:
    assert "".join(fp.answer_pieces(5)) == TEXT
    assert fp.answer_pieces(2) == ("Hello", " from")
    assert "".join(fp.answer_pieces(10)) == f"{TEXT} {TEXT}"
    with pytest.raises(ValueError, match="at least one"):
        fp.answer_pieces(0)


def test_fake_usage_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="cannot exceed"):
        FakeUsage(output_tokens=1, reasoning_tokens=2)
    with pytest.raises(ValueError, match=">= 0"):
        FakeUsage(input_tokens=-1)


@given(usages, st.integers(1, 40), st.booleans())
def test_openai_chat_stream_deltas_and_usage(usage: FakeUsage, events: int, include_usage: bool) -> None:
    call = make_call(usage, events)
    body: dict[str, Any] = {"stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    reply = fake_openai.openai_chat(call, body, "gpt-4o-mini")
    assert reply.frames is not None
    assert reply.frames[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(data) for _, data in sse_events(b"".join(reply.frames[:-1]))]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == call.text
    assert len(reply.frames) == events + 3 + include_usage
    if include_usage:
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
        final = chunks[-1]
        assert final["choices"] == []
        assert final["usage"]["prompt_tokens"] == usage.input_tokens + usage.cache_read_tokens + (
            usage.cache_write_tokens
        )
        assert final["usage"]["prompt_tokens_details"]["cached_tokens"] == usage.cache_read_tokens
        assert final["usage"]["completion_tokens"] == usage.output_tokens
        assert final["usage"]["completion_tokens_details"]["reasoning_tokens"] == usage.reasoning_tokens
    else:
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@given(usages, st.integers(1, 20))
def test_responses_stream_is_sequenced_and_ends_completed(usage: FakeUsage, events: int) -> None:
    reply = fake_openai.openai_responses(make_call(usage, events), {"stream": True}, "gpt-5")
    assert reply.frames is not None
    parsed = sse_events(b"".join(reply.frames))
    assert all(name == json.loads(data)["type"] for name, data in parsed)
    assert [json.loads(data)["sequence_number"] for _, data in parsed] == list(range(len(parsed)))
    names = [name for name, _ in parsed]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[4 : 4 + events] == ["response.output_text.delta"] * events
    assert names[4 + events :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final_usage = json.loads(parsed[-1][1])["response"]["usage"]
    assert final_usage["input_tokens_details"]["cached_tokens"] == usage.cache_read_tokens
    assert final_usage["output_tokens_details"]["reasoning_tokens"] == usage.reasoning_tokens
    assert final_usage["total_tokens"] == final_usage["input_tokens"] + usage.output_tokens


@given(usages, st.integers(1, 20))
def test_anthropic_stream_usage_is_cumulative(usage: FakeUsage, events: int) -> None:
    reply = fake_anthropic.anthropic_messages(make_call(usage, events), {"stream": True}, "claude-haiku-4-5")
    assert reply.frames is not None
    parsed = [(name, json.loads(data)) for name, data in sse_events(b"".join(reply.frames))]
    names = [name for name, _ in parsed]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * events,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start_usage = parsed[0][1]["message"]["usage"]
    assert start_usage["input_tokens"] == usage.input_tokens
    assert start_usage["cache_read_input_tokens"] == usage.cache_read_tokens
    assert start_usage["cache_creation_input_tokens"] == usage.cache_write_tokens
    assert start_usage["output_tokens"] == 1
    assert parsed[-2][1]["usage"]["output_tokens"] == usage.output_tokens
    assert "".join(obj["delta"]["text"] for name, obj in parsed if name == "content_block_delta") == (
        "".join(fp.answer_pieces(events))
    )


@given(usages, st.integers(1, 20))
def test_gemini_usage_metadata(usage: FakeUsage, events: int) -> None:
    reply = fake_gemini.gemini_generate(make_call(usage, events), "gemini-2.5-flash", stream=True, sse=True)
    assert reply.frames is not None
    assert all(frame.endswith(b"}\r\n\r\n") and frame.startswith(b"data: {") for frame in reply.frames)
    chunks = [json.loads(data) for _, data in sse_events(b"".join(reply.frames))]
    final = chunks[-1]
    assert final["candidates"][0]["finishReason"] == "STOP"
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    meta = final["usageMetadata"]
    assert meta["promptTokenCount"] == usage.input_tokens + usage.cache_read_tokens
    assert meta["candidatesTokenCount"] + meta.get("thoughtsTokenCount", 0) == usage.output_tokens
    assert ("thoughtsTokenCount" in meta) == (usage.reasoning_tokens > 0)
    assert ("cachedContentTokenCount" in meta) == (usage.cache_read_tokens > 0)
    assert meta["totalTokenCount"] == meta["promptTokenCount"] + usage.output_tokens
    assert all("usageMetadata" in c for c in chunks)


def test_gemini_json_array_stream_framing() -> None:
    reply = fake_gemini.gemini_generate(make_call(FakeUsage(), 3), "gemini-2.5-flash", stream=True, sse=False)
    assert reply.frames is not None
    assert reply.frames[0].startswith(b"[{")
    assert reply.frames[1].startswith(b"\n,\r\n{")
    assert reply.frames[-1] == b"\n]"
    items = json.loads(b"".join(reply.frames))
    assert "".join(i["candidates"][0]["content"]["parts"][0]["text"] for i in items) == "Hello from the"


@given(st.lists(st.text(max_size=20), min_size=1, max_size=5), st.integers(1, 64))
def test_embedding_base64_matches_floats(inputs: list[str], dimensions: int) -> None:
    call = make_call(FakeUsage())
    floats = json.loads(
        fake_openai.openai_embeddings(call, {"input": inputs, "dimensions": dimensions}, "m").body
    )
    b64 = json.loads(
        fake_openai.openai_embeddings(
            call, {"input": inputs, "dimensions": dimensions, "encoding_format": "base64"}, "m"
        ).body
    )
    for as_float, as_b64 in zip(floats["data"], b64["data"], strict=True):
        decoded = list(struct.unpack(f"<{dimensions}f", base64.b64decode(as_b64["embedding"])))
        assert decoded == as_float["embedding"]
        assert len(decoded) == dimensions


# -------------------------------------------------------------------------------- routes and auth


async def test_openai_routes(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, usage=FakeUsage(input_tokens=20, cache_read_tokens=5, reasoning_tokens=2))
    chat = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "gpt-4o-mini", "messages": []})
    assert chat.status == 200
    assert chat.complete
    assert chat.headers("content-length") == [str(len(chat.body))]
    payload = chat.json()
    assert payload["object"] == "chat.completion"
    assert payload["model"] == "gpt-4o-mini"
    assert payload["choices"][0]["message"]["content"] == TEXT
    assert payload["usage"]["prompt_tokens"] == 25
    assert payload["usage"]["prompt_tokens_details"]["cached_tokens"] == 5
    assert payload["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2
    assert b'":"' in chat.body
    assert b'": "' not in chat.body
    for header in ("set-cookie", "openai-organization", "x-ratelimit-limit-requests", "cf-ray", "server"):
        assert chat.headers(header), header
    assert chat.headers("x-request-id")

    completions = await exchange(
        port, "POST", "/v1/completions", OPENAI_AUTH, {"model": "gpt-3.5-turbo-instruct"}
    )
    assert completions.json()["object"] == "text_completion"
    assert completions.json()["choices"][0]["text"] == TEXT

    stream = await exchange(
        port, "POST", "/v1/completions", OPENAI_AUTH, {"model": "m", "prompt": "x", "stream": True}
    )
    assert stream.headers("content-type") == ["text/event-stream; charset=utf-8"]
    assert stream.chunks[-1] == b"data: [DONE]\n\n"
    assert len(stream.chunks) == 5 + 2  # deltas, the finish chunk, [DONE]: one HTTP chunk each

    models = await exchange(port, "GET", "/v1/models", OPENAI_AUTH)
    assert models.json()["object"] == "list"
    assert {m["id"] for m in models.json()["data"]} >= {"gpt-4o-mini"}
    one = await exchange(port, "GET", "/v1/models/gpt-4o", OPENAI_AUTH)
    assert one.json() == {"id": "gpt-4o", "object": "model", "created": 1686935002, "owned_by": "system"}

    bad = await exchange(port, "POST", CHAT, OPENAI_AUTH, b"{not json")
    assert bad.status == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    no_model = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"messages": []})
    assert no_model.status == 400
    assert "model" in no_model.json()["error"]["message"]


async def test_anthropic_routes(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, usage=FakeUsage(input_tokens=9, output_tokens=4, cache_write_tokens=3))
    message = await exchange(
        port, "POST", MESSAGES, ANTHROPIC_AUTH, {"model": "claude-haiku-4-5", "max_tokens": 9}
    )
    body = message.json()
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": TEXT}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] == 9
    assert body["usage"]["cache_creation_input_tokens"] == 3
    assert body["usage"]["cache_read_input_tokens"] == 0
    assert body["usage"]["output_tokens"] == 4
    assert message.headers("anthropic-organization-id")
    assert message.headers("request-id")

    count = await exchange(
        port, "POST", "/v1/messages/count_tokens", ANTHROPIC_AUTH, {"model": "c", "messages": []}
    )
    assert count.json() == {"input_tokens": 9}
    models = await exchange(port, "GET", "/v1/models", ANTHROPIC_AUTH)
    assert models.json()["data"][0]["type"] == "model"
    assert models.json()["has_more"] is False

    no_version = await exchange(port, "POST", MESSAGES, [("x-api-key", KEY)], {"model": "c"})
    assert no_version.status == 400
    assert no_version.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }


async def test_gemini_routes(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, usage=FakeUsage(input_tokens=10, output_tokens=6, cache_read_tokens=4))
    for prefix in ("/v1beta", "/v1"):
        generate = await exchange(
            port, "POST", f"{prefix}/models/gemini-2.5-flash:generateContent", GEMINI_AUTH, {"contents": []}
        )
        body = generate.json()
        assert body["candidates"][0]["content"]["parts"][0]["text"] == TEXT
        assert body["candidates"][0]["finishReason"] == "STOP"
        assert body["usageMetadata"]["promptTokenCount"] == 14
        assert body["usageMetadata"]["cachedContentTokenCount"] == 4
        assert body["usageMetadata"]["candidatesTokenCount"] == 6
        assert "thoughtsTokenCount" not in body["usageMetadata"]
        assert body["modelVersion"] == "gemini-2.5-flash"
        assert body["responseId"]

    sse = await exchange(port, "POST", GEMINI_SSE, GEMINI_AUTH, {"contents": []})
    assert sse.headers("content-type") == ["text/event-stream"]
    assert len(sse.chunks) == 5
    assert all(c.endswith(b"\r\n\r\n") for c in sse.chunks)

    array = await exchange(
        port, "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", GEMINI_AUTH, {"contents": []}
    )
    assert array.headers("content-type") == ["application/json; charset=UTF-8"]
    assert len(json.loads(array.body)) == 5

    count = await exchange(port, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", GEMINI_AUTH, {})
    assert count.json()["totalTokens"] == 14
    embed = await exchange(
        port,
        "POST",
        "/v1beta/models/gemini-embedding-001:embedContent",
        GEMINI_AUTH,
        {"content": {"parts": [{"text": "hi"}]}, "outputDimensionality": 8},
    )
    assert len(embed.json()["embedding"]["values"]) == 8
    batch = await exchange(
        port,
        "POST",
        "/v1beta/models/gemini-embedding-001:batchEmbedContents",
        GEMINI_AUTH,
        {"requests": [{"content": {"parts": [{"text": "a"}]}}, {"content": {"parts": [{"text": "b"}]}}]},
    )
    assert len(batch.json()["embeddings"]) == 2
    models = await exchange(port, "GET", "/v1beta/models", GEMINI_AUTH)
    assert all(m["name"].startswith("models/") for m in models.json()["models"])
    by_query = await exchange(port, "GET", f"/v1/models?key={KEY}", [])
    assert by_query.status == 200
    assert "models" in by_query.json()


@pytest.mark.parametrize(
    ("target", "headers", "check"),
    [
        (CHAT, [("authorization", "Bearer sk-wrong")], lambda b: b["error"]["code"] == "invalid_api_key"),
        (CHAT, [], lambda b: b["error"]["type"] == "invalid_request_error"),
        (
            MESSAGES,
            [("x-api-key", "sk-wrong"), ("anthropic-version", "2023-06-01")],
            lambda b: b["type"] == "error" and b["error"]["type"] == "authentication_error",
        ),
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            [("x-goog-api-key", "sk-wrong")],
            lambda b: b["error"]["code"] == 401 and b["error"]["status"] == "UNAUTHENTICATED",
        ),
        (
            "/v1beta/models/gemini-2.5-flash:generateContent?key=sk-wrong",
            [],
            lambda b: b["error"]["code"] == 401,
        ),
    ],
)
async def test_unknown_key_gets_401_in_the_provider_format(nursery, target, headers, check) -> None:
    fake, port = await start(nursery)
    result = await exchange(port, "POST", target, headers, {"model": "m"})
    assert result.status == 401
    assert check(result.json())
    assert b"sk-wrong" not in result.body  # keys are never echoed
    assert len(fake.captured) == 1


@pytest.mark.parametrize(
    ("method", "target", "headers", "check"),
    [
        ("POST", "/v1/nope", OPENAI_AUTH, lambda b: b["error"]["message"] == "Invalid URL (POST /v1/nope)"),
        ("GET", CHAT, OPENAI_AUTH, lambda b: "Invalid URL" in b["error"]["message"]),
        ("POST", "/v1/messages/nope", ANTHROPIC_AUTH, lambda b: b["error"]["type"] == "not_found_error"),
        ("POST", "/v1beta/models/x:nope", GEMINI_AUTH, lambda b: b["error"]["status"] == "NOT_FOUND"),
        ("POST", "/v1beta/tunedModels", GEMINI_AUTH, lambda b: b["error"]["code"] == 404),
    ],
)
async def test_unknown_path_gets_404_in_the_provider_format(nursery, method, target, headers, check) -> None:
    _, port = await start(nursery)
    result = await exchange(port, method, target, headers, {})
    assert result.status == 404
    assert check(result.json())


async def test_keep_alive_and_capture(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        for n in range(3):
            body = json.dumps({"model": "gpt-4o-mini", "stream": n == 1}).encode()
            headers = [*OPENAI_AUTH, ("x-test", str(n))]
            await stream.send_all(request_bytes(conn, "POST", f"{CHAT}?n={n}", headers, body))
            result = await receive_response(stream, conn)
            assert result.status == 200
            assert result.complete
            conn.start_next_cycle()
        assert fake.open_connections == 1
    await wait_for_closed(fake)
    assert fake.closed_connections == 1
    assert [r.query for r in fake.captured] == ["n=0", "n=1", "n=2"]
    first = fake.captured[0]
    assert isinstance(first, CapturedRequest)
    assert (first.method, first.path, first.target) == ("POST", CHAT, f"{CHAT}?n=0")
    assert [name for name, _ in first.headers] == [
        "host",
        "authorization",
        "content-type",
        "x-test",
        "content-length",
    ]
    assert first.header("X-Test") == "0"
    assert first.json() == {"model": "gpt-4o-mini", "stream": False}


async def test_pipelined_requests_and_connection_close(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        # h11 will not let a client pipeline, so each request is rendered by a connection of its own
        first = request_bytes(
            h11.Connection(h11.CLIENT), "POST", CHAT, OPENAI_AUTH, b'{"model":"a","stream":true}'
        )
        closing = [*OPENAI_AUTH, ("connection", "close")]
        second = request_bytes(h11.Connection(h11.CLIENT), "POST", CHAT, closing, b'{"model":"b"}')
        await stream.send_all(first + second)  # both requests in one segment
        reader = h11.Connection(h11.CLIENT)
        reader.send(h11.Request(method="POST", target=CHAT, headers=[("host", "x"), ("content-length", "0")]))
        reader.send(h11.EndOfMessage())
        streamed = await receive_response(stream, reader)
        assert streamed.complete
        assert streamed.chunks[-1] == b"data: [DONE]\n\n"
        reader.start_next_cycle()
        reader.send(h11.Request(method="POST", target=CHAT, headers=[("host", "x"), ("content-length", "0")]))
        reader.send(h11.EndOfMessage())
        plain = await receive_response(stream, reader)
        assert plain.json()["model"] == "b"
        assert plain.headers("connection") == ["close"]
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # the fake closed, as the client asked
    assert [r.json()["model"] for r in fake.captured] == ["a", "b"]


async def test_http10_client_gets_a_close_delimited_stream(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery, events=2)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    body = b'{"model":"m","stream":true}'
    head = f"POST {CHAT} HTTP/1.0\r\nauthorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n"
    async with stream:
        await stream.send_all(head.encode() + body)
        raw = b""
        with trio.fail_after(5):
            while data := await stream.receive_some():
                raw += data
    response_head, _, payload = raw.partition(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in response_head
    assert b"connection: close" in response_head
    assert payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")
    assert fake.captured[0].http_version == "1.0"


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    _, port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    body = b'{"model":"m"}'
    head = f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\nexpect: 100-continue\r\n"
    head += f"content-length: {len(body)}\r\n\r\n"
    async with stream:
        await stream.send_all(head.encode())
        with trio.fail_after(5):
            interim = await stream.receive_some()
        assert interim.startswith(b"HTTP/1.1 100 ")
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target=CHAT, headers=[("host", "x"), ("content-length", "0")]))
        conn.send(h11.EndOfMessage())
        await stream.send_all(body)
        result = await receive_response(stream, conn)
    assert result.status == 200


async def test_oversized_body_gets_413(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery, max_body_size=1000)
    result = await exchange(port, "POST", MESSAGES, ANTHROPIC_AUTH, b"x" * 5000)
    assert result.status == 413
    assert result.json()["error"]["type"] == "request_too_large"
    assert fake.captured == []
    await wait_for_closed(fake)


async def test_fault_is_not_spent_on_unauthenticated_or_unknown_requests(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(status=500))
    assert (
        await exchange(port, "POST", CHAT, [("authorization", "Bearer nope")], {"model": "m"})
    ).status == 401
    assert (await exchange(port, "POST", "/v1/unknown", OPENAI_AUTH, {})).status == 404
    assert (await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m"})).status == 500
    assert (await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m"})).status == 200


async def test_many_concurrent_connections(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    statuses: list[int] = []

    async def one() -> None:
        result = await exchange(port, "POST", GEMINI_SSE, GEMINI_AUTH, {"contents": []})
        statuses.append(result.status)

    async with trio.open_nursery() as clients:
        for _ in range(50):
            clients.start_soon(one)
    assert statuses == [200] * 50
    await wait_for_closed(fake)
    assert fake.closed_connections == 50


async def test_malformed_http_gets_400(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    await wait_for_closed(fake)


async def test_idle_keep_alive_connection_is_closed(nursery: trio.Nursery, autojump_clock) -> None:
    fake, port = await start(nursery, idle_timeout=30)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        started = trio.current_time()
        assert await stream.receive_some() == b""
        assert trio.current_time() - started == pytest.approx(30)
    await wait_for_closed(fake)


# -------------------------------------------------------------------------------- faults


async def test_status_fault_with_headers_times_and_path(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(status=429, headers=(("retry-after", "7"),), times=2), path_contains="messages")
    fake.add_fault(Fault(status=503), path_contains=":generateContent")
    chat = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m"})
    assert chat.status == 200  # the path does not match the first fault
    for _ in range(2):
        limited = await exchange(port, "POST", MESSAGES, ANTHROPIC_AUTH, {"model": "m", "stream": True})
        assert limited.status == 429
        assert limited.headers("retry-after") == ["7"]
        assert limited.json()["error"]["type"] == "rate_limit_error"
    after = await exchange(port, "POST", MESSAGES, ANTHROPIC_AUTH, {"model": "m"})
    assert after.status == 200
    gemini = await exchange(port, "POST", "/v1beta/models/g:generateContent", GEMINI_AUTH, {})
    assert gemini.status == 503
    assert gemini.json()["error"]["status"] == "UNAVAILABLE"
    unauthorised = await exchange(port, "POST", CHAT, [], {"model": "m"})
    assert unauthorised.status == 401


async def test_openai_status_fault_body(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(status=500))
    result = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m"})
    assert result.status == 500
    assert result.json()["error"]["type"] == "server_error"


async def test_first_byte_and_chunk_delays(nursery: trio.Nursery, autojump_clock) -> None:
    fake, port = await start(nursery, chunk_delay=0.5)
    fake.add_fault(Fault(first_byte_delay=3.0, chunk_delay=1.0))
    sent = trio.current_time()
    result = await exchange(port, "POST", GEMINI_SSE, GEMINI_AUTH, {})
    assert result.complete
    assert result.head_at - sent == pytest.approx(3.0)
    gaps = [b - a for a, b in zip(result.chunk_times, result.chunk_times[1:], strict=False)]
    assert gaps == pytest.approx([1.0] * 4)
    # without a fault the server's default chunk delay applies
    sent = trio.current_time()
    plain = await exchange(port, "POST", MESSAGES, ANTHROPIC_AUTH, {"model": "m", "stream": True})
    assert plain.complete
    assert len(plain.chunks) == 5 + 6
    assert plain.chunk_times[-1] - sent == pytest.approx(0.5 * 10)


async def test_die_after_events_fin_and_reset(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(die_after_events=2))
    fin = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m", "stream": True})
    assert fin.status == 200
    assert not fin.complete
    assert fin.ended_by == "eof"
    assert len(fin.chunks) == 2

    fake.add_fault(Fault(die_after_events=3, reset=True))
    rst = await exchange(port, "POST", MESSAGES, ANTHROPIC_AUTH, {"model": "m", "stream": True})
    assert not rst.complete
    assert rst.ended_by == "reset"

    fake.add_fault(Fault(die_after_events=0))
    head_only = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m"})
    assert head_only.status == 200
    assert head_only.chunks == []
    assert head_only.ended_by == "eof"
    await wait_for_closed(fake)


async def test_die_after_every_event_still_withholds_the_last_chunk(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery, events=1)
    fake.add_fault(Fault(die_after_events=100))
    result = await exchange(port, "POST", GEMINI_SSE, GEMINI_AUTH, {})
    assert len(result.chunks) == 1
    assert not result.complete
    assert result.ended_by == "eof"


async def test_stall_keeps_the_socket_open_until_the_client_leaves(
    nursery: trio.Nursery, autojump_clock
) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(stall_after_events=2))
    result = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m", "stream": True}, wait_limit=60)
    assert result.ended_by == "timeout"  # the fake said nothing more for 60 s and did not close
    assert len(result.chunks) == 2
    await wait_for_closed(fake)  # the client closed; the watcher noticed at once
    assert fake.closed_connections == 1


async def test_stall_is_bounded_by_the_idle_timeout(nursery: trio.Nursery, autojump_clock) -> None:
    fake, port = await start(nursery, idle_timeout=50)
    fake.add_fault(Fault(stall_after_events=1))
    result = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m", "stream": True}, wait_limit=1000)
    assert result.ended_by == "eof"
    assert len(result.chunks) == 1


@pytest.mark.parametrize(
    ("target", "headers", "body", "check"),
    [
        (
            MESSAGES,
            ANTHROPIC_AUTH,
            {"model": "m", "stream": True},
            lambda raw: raw == ANTHROPIC_OVERLOADED,
        ),
        (CHAT, OPENAI_AUTH, {"model": "m", "stream": True}, lambda raw: b'data: {"error":' in raw),
        (
            "/v1/responses",
            OPENAI_AUTH,
            {"model": "m", "stream": True},
            lambda raw: raw.startswith(b"event: error"),
        ),
        (
            GEMINI_SSE,
            GEMINI_AUTH,
            {},
            lambda raw: b'"status": "UNAVAILABLE"' in raw and raw.endswith(b"\r\n\r\n"),
        ),
    ],
)
async def test_inband_error(nursery, target, headers, body, check) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(inband_error=True))
    result = await exchange(port, "POST", target, headers, body)
    assert result.status == 200
    assert result.complete
    assert len(result.chunks) == 1
    assert check(result.chunks[0])


async def test_close_delimited_body(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery)
    fake.add_fault(Fault(close_delimited=True), path_contains="chat")
    fake.add_fault(Fault(close_delimited=True), path_contains="generateContent")
    stream = await exchange(port, "POST", CHAT, OPENAI_AUTH, {"model": "m", "stream": True})
    assert stream.complete  # h11 reads to EOF, which ends a close-delimited body
    assert not stream.headers("content-length")
    assert not stream.headers("transfer-encoding")
    assert stream.headers("connection") == ["close"]
    assert stream.body.endswith(b"data: [DONE]\n\n")
    plain = await exchange(port, "POST", "/v1beta/models/g:generateContent", GEMINI_AUTH, {})
    assert plain.complete
    assert plain.json()["candidates"]
    await wait_for_closed(fake)


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="reset"):
        Fault(reset=True)
    with pytest.raises(ValueError, match="either"):
        Fault(die_after_events=1, stall_after_events=1)
    with pytest.raises(ValueError, match="at least one"):
        Fault(times=0)


# -------------------------------------------------------------------------------- lifecycle


async def test_client_leaving_mid_stream_closes_the_connection(nursery: trio.Nursery, autojump_clock) -> None:
    fake, port = await start(nursery, chunk_delay=10.0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(request_bytes(conn, "POST", CHAT, OPENAI_AUTH, b'{"model":"m","stream":true}'))
    first = await stream.receive_some()
    assert first.startswith(b"HTTP/1.1 200")
    assert fake.open_connections == 1
    before = trio.current_time()
    await stream.aclose()
    await wait_for_closed(fake)
    assert trio.current_time() - before < 10.0  # noticed at once, not at the next event


async def test_client_reset_mid_stream_leaves_the_fake_serving(nursery: trio.Nursery, autojump_clock) -> None:
    fake, port = await start(nursery, chunk_delay=1.0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(
        request_bytes(conn, "POST", MESSAGES, ANTHROPIC_AUTH, b'{"model":"m","stream":true}')
    )
    assert await stream.receive_some()
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()  # RST
    await wait_for_closed(fake)
    after = await exchange(port, "POST", MESSAGES, ANTHROPIC_AUTH, {"model": "m"})
    assert after.status == 200


async def test_cancelling_serve_closes_every_socket() -> None:
    fake = FakeUpstream(chunk_delay=100.0)
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def run_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with server_scope:
                await fake.serve(task_status=task_status)

        port = await outer.start(run_server)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        await busy.send_all(
            request_bytes(conn, "POST", MESSAGES, ANTHROPIC_AUTH, b'{"model":"m","stream":true}')
        )
        with trio.fail_after(5):
            assert await busy.receive_some()
            await fake.wait_for_open_connections(2)
        server_scope.cancel()
    assert fake.open_connections == 0
    assert fake.closed_connections == 2
    with trio.fail_after(5):
        assert await idle.receive_some() == b""
        while await busy.receive_some():
            pass
    await idle.aclose()
    await busy.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_tls(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    fake = FakeUpstream()
    port = await nursery.start(
        lambda task_status: fake.serve(ssl_context=server_context, task_status=task_status)
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1")
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(request_bytes(conn, "POST", GEMINI_SSE, GEMINI_AUTH, b"{}"))
        result = await receive_response(stream, conn)
    assert result.complete
    assert len(result.chunks) == 5
    fake.add_fault(Fault(die_after_events=1, reset=True))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1")
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(request_bytes(conn, "POST", GEMINI_SSE, GEMINI_AUTH, b"{}"))
        died = await receive_response(stream, conn)
    assert died.ended_by == "reset"
    assert len(died.chunks) == 1
    await wait_for_closed(fake)


async def test_cli_serves_until_killed() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    command = [sys.executable, "-m", "trioproxy.testing.fake_upstream", "--port", str(port), "--events", "2"]
    process = await trio.lowlevel.open_process(command, stdout=-1)
    try:
        assert process.stdout is not None
        with trio.fail_after(20):
            line = await process.stdout.receive_some()
        assert f"127.0.0.1:{port}".encode() in line
        result = await exchange(port, "POST", GEMINI_SSE, GEMINI_AUTH, {})
        assert len(result.chunks) == 2
    finally:
        process.kill()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


# -------------------------------------------------------------------------------- official SDKs


async def test_openai_sdk(nursery: trio.Nursery) -> None:
    fake, port = await start(
        nursery, usage=FakeUsage(input_tokens=30, cache_read_tokens=10, reasoning_tokens=3)
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)

    def calls() -> dict[str, Any]:
        with client:
            plain = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            events = list(client.responses.create(model="gpt-5", input="hi", stream=True))
            response = client.responses.create(model="gpt-5", input="hi")
            embedding = client.embeddings.create(
                model="text-embedding-3-small", input=["a", "b"], dimensions=4
            )
            models = client.models.list()
            try:
                openai.OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-nope", max_retries=0
                ).models.list()
            except openai.AuthenticationError as exc:
                auth_error = exc
            return locals()

    got = await trio.to_thread.run_sync(calls)
    assert got["plain"].choices[0].message.content == TEXT
    assert got["plain"].usage.prompt_tokens == 40
    assert got["plain"].usage.prompt_tokens_details.cached_tokens == 10
    assert got["plain"].usage.completion_tokens_details.reasoning_tokens == 3
    chunks = got["chunks"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 40
    events = got["events"]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == TEXT
    assert events[-1].response.usage.input_tokens_details.cached_tokens == 10
    assert got["response"].output_text == TEXT
    assert got["response"].usage.output_tokens == 7
    vectors = [d.embedding for d in got["embedding"].data]
    assert [len(v) for v in vectors] == [4, 4]
    assert fake.captured[4].json()["encoding_format"] == "base64"  # the SDK asked for base64 and decoded it
    assert vectors[0] == fp.embedding_vector("a", 0, 4)
    assert {m.id for m in got["models"]} >= {"gpt-4o-mini"}
    assert got["auth_error"].status_code == 401


async def test_anthropic_sdk(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery, usage=FakeUsage(input_tokens=12, output_tokens=5, cache_read_tokens=2))
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]

    def calls() -> dict[str, Any]:
        with client:
            plain = client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=messages)
            with client.messages.stream(model="claude-haiku-4-5", max_tokens=16, messages=messages) as stream:
                streamed_text = "".join(stream.text_stream)
                final = stream.get_final_message()
            count = client.messages.count_tokens(model="claude-haiku-4-5", messages=messages)
            fake.add_fault(Fault(inband_error=True))
            try:
                list(client.messages.create(model="c", max_tokens=16, messages=messages, stream=True))
            except anthropic.APIStatusError as exc:
                inband = exc
            fake.add_fault(Fault(status=529))
            try:
                client.messages.create(model="c", max_tokens=16, messages=messages)
            except anthropic.APIStatusError as exc:
                overloaded = exc
            return locals()

    got = await trio.to_thread.run_sync(calls)
    assert got["plain"].content[0].text == TEXT
    assert got["plain"].usage.cache_read_input_tokens == 2
    assert got["streamed_text"] == TEXT
    assert got["final"].usage.output_tokens == 5
    assert got["final"].usage.input_tokens == 12
    assert got["count"].input_tokens == 12
    assert "Overloaded" in str(got["inband"])
    assert got["overloaded"].status_code == 529
    assert fake.captured[0].header("anthropic-version")
    # anthropic 2.x sends its api_key as a Bearer token; the fake accepts that as well as x-api-key
    first = fake.captured[0]
    assert first.header("x-api-key") == KEY or first.header("authorization") == f"Bearer {KEY}"


async def test_gemini_sdk(nursery: trio.Nursery) -> None:
    fake, port = await start(nursery, usage=FakeUsage(input_tokens=8, output_tokens=6, reasoning_tokens=2))
    client = genai.Client(
        api_key=KEY, http_options=genai_types.HttpOptions(base_url=f"http://127.0.0.1:{port}")
    )

    def calls() -> dict[str, Any]:
        plain = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
        chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
        count = client.models.count_tokens(model="gemini-2.5-flash", contents="hi")
        embedding = client.models.embed_content(
            model="gemini-embedding-001",
            contents=cast(Any, ["a", "b"]),  # the SDK's union type is invariant in the list's item type
            config=genai_types.EmbedContentConfig(output_dimensionality=4),
        )
        client.close()
        return locals()

    got = await trio.to_thread.run_sync(calls)
    assert got["plain"].text == TEXT
    assert got["plain"].usage_metadata.thoughts_token_count == 2
    assert got["plain"].usage_metadata.candidates_token_count == 4
    assert "".join(c.text for c in got["chunks"]) == TEXT
    assert got["chunks"][-1].candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert got["count"].total_tokens == 8
    assert [len(e.values) for e in got["embedding"].embeddings] == [4, 4]
    assert fake.captured[1].target.endswith(":streamGenerateContent?alt=sse")
    assert fake.captured[0].header("x-goog-api-key") == KEY
