"""UsageMeter: token usage from real-looking provider bodies, streamed or whole, split anywhere."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.records import Usage
from trioproxy.snapshot import ProviderKind
from trioproxy.usage import StreamFormat, UsageMeter

OPENAI, ANTHROPIC, GEMINI = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI
SSE, JSON, ARRAY = StreamFormat.SSE, StreamFormat.JSON, StreamFormat.JSON_ARRAY


def meter(kind: ProviderKind, fmt: StreamFormat, *chunks: bytes, max_buffer: int | None = None) -> Usage:
    m = UsageMeter(kind, fmt) if max_buffer is None else UsageMeter(kind, fmt, max_buffer=max_buffer)
    for chunk in chunks:
        m.feed(chunk)
    return m.finish()


def sse(*objects: Any, event_names: list[str] | None = None, eol: str = "\n") -> bytes:
    out = []
    for i, obj in enumerate(objects):
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        head = f"event: {event_names[i]}{eol}" if event_names else ""
        out.append(f"{head}data: {data}{eol}{eol}")
    return "".join(out).encode()


# -- OpenAI ---------------------------------------------------------------------------------------------

CHAT_MODEL = "gpt-4o-2024-08-06"


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9",
        "object": "chat.completion.chunk",
        "created": 1741000000,
        "model": CHAT_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 128,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT_STREAM_BODY = [
    chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    chat_chunk({"content": 'The "usage" of words'}),
    chat_chunk({}, "stop"),
    {**chat_chunk({}), "choices": [], "usage": CHAT_USAGE},
    "[DONE]",
]
CHAT_STREAM = sse(*CHAT_STREAM_BODY)
CHAT_EXPECTED = Usage(
    input_tokens=176,
    output_tokens=300,
    cache_read_tokens=1024,
    reasoning_tokens=128,
    reported=True,
    complete=True,
    response_model=CHAT_MODEL,
)


def test_openai_chat_stream() -> None:
    assert meter(OPENAI, SSE, CHAT_STREAM) == CHAT_EXPECTED


def test_openai_chat_stream_without_include_usage_is_complete_but_unreported() -> None:
    body = sse(chat_chunk({"content": "hi"}), chat_chunk({}, "stop"), "[DONE]")
    usage = meter(OPENAI, SSE, body)
    assert usage.complete
    assert not usage.reported
    assert usage.input_tokens == usage.output_tokens == 0


def test_openai_chat_stream_interrupted_before_done() -> None:
    cut = CHAT_STREAM.index(b"data: [DONE]")
    usage = meter(OPENAI, SSE, CHAT_STREAM[:cut])
    assert usage == Usage(**{**_fields(CHAT_EXPECTED), "complete": False})


def test_openai_chat_stream_interrupted_before_usage() -> None:
    cut = CHAT_STREAM.index(b'"choices":[]') - 20
    usage = meter(OPENAI, SSE, CHAT_STREAM[:cut])
    assert not usage.reported
    assert not usage.complete


def test_openai_in_band_error_is_not_complete() -> None:
    body = sse(chat_chunk({"content": "hi"}), {"error": {"message": "boom", "type": "server_error"}})
    usage = meter(OPENAI, SSE, body)
    assert not usage.complete


def test_openai_chat_json() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": CHAT_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": CHAT_USAGE,
    }
    assert meter(OPENAI, JSON, json.dumps(body, indent=2).encode()) == CHAT_EXPECTED


def test_openai_embeddings_json() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert meter(OPENAI, JSON, json.dumps(body).encode()) == Usage(
        input_tokens=8, reported=True, complete=True, response_model="text-embedding-3-small"
    )


RESPONSES_MODEL = "o4-mini-2025-04-16"
RESPONSES_USAGE = {
    "input_tokens": 500,
    "input_tokens_details": {"cached_tokens": 100},
    "output_tokens": 250,
    "output_tokens_details": {"reasoning_tokens": 200},
    "total_tokens": 750,
}
RESPONSES_EXPECTED = Usage(
    input_tokens=400,
    output_tokens=250,
    cache_read_tokens=100,
    reasoning_tokens=200,
    reported=True,
    complete=True,
    response_model=RESPONSES_MODEL,
)


def response_obj(status: str, usage: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1741000000,
        "status": status,
        "error": None,
        "model": RESPONSES_MODEL,
        "output": [],
        "usage": usage,
    }


RESPONSES_STREAM = sse(
    {"type": "response.created", "sequence_number": 0, "response": response_obj("in_progress", None)},
    {"type": "response.in_progress", "sequence_number": 1, "response": response_obj("in_progress", None)},
    {
        "type": "response.output_text.delta",
        "sequence_number": 4,
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "delta": "Hi",
    },
    {
        "type": "response.completed",
        "sequence_number": 9,
        "response": response_obj("completed", RESPONSES_USAGE),
    },
    event_names=[
        "response.created",
        "response.in_progress",
        "response.output_text.delta",
        "response.completed",
    ],
)


def test_openai_responses_stream() -> None:
    assert meter(OPENAI, SSE, RESPONSES_STREAM) == RESPONSES_EXPECTED


def test_openai_responses_stream_interrupted() -> None:
    cut = RESPONSES_STREAM.index(b"event: response.completed")
    usage = meter(OPENAI, SSE, RESPONSES_STREAM[:cut])
    assert not usage.complete
    assert not usage.reported


def test_openai_responses_json() -> None:
    body = json.dumps(response_obj("completed", RESPONSES_USAGE)).encode()
    assert meter(OPENAI, JSON, body) == RESPONSES_EXPECTED


# -- Anthropic ------------------------------------------------------------------------------------------

CLAUDE = "claude-sonnet-4-5-20250929"


def message_start(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": CLAUDE,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        },
    }


START_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 2000,
    "output_tokens": 1,
}


def anthropic_stream(*deltas: dict[str, Any], stop: bool = True) -> bytes:
    events: list[tuple[str, Any]] = [
        ("message_start", message_start(START_USAGE)),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "message_"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    for usage in deltas:
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    if stop:
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(*(obj for _, obj in events), event_names=[name for name, _ in events])


ANTHROPIC_EXPECTED = Usage(
    input_tokens=25,
    output_tokens=15,
    cache_read_tokens=2000,
    cache_write_tokens=1000,
    reported=True,
    complete=True,
    response_model=CLAUDE,
)


def test_anthropic_stream() -> None:
    assert meter(ANTHROPIC, SSE, anthropic_stream({"output_tokens": 15})) == ANTHROPIC_EXPECTED


def test_anthropic_delta_counts_are_cumulative_not_summed() -> None:
    body = anthropic_stream({"output_tokens": 10}, {"output_tokens": 15})
    assert meter(ANTHROPIC, SSE, body).output_tokens == 15


def test_anthropic_delta_input_fields_replace_start_values_and_nulls_do_not() -> None:
    delta = {
        "input_tokens": 30,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 2100,
        "output_tokens": 15,
    }
    usage = meter(ANTHROPIC, SSE, anthropic_stream(delta))
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_read_tokens) == (30, 1000, 2100)


def test_anthropic_interrupted_stream_keeps_start_counts() -> None:
    body = anthropic_stream(stop=False)
    assert meter(ANTHROPIC, SSE, body) == Usage(
        input_tokens=25,
        output_tokens=1,
        cache_read_tokens=2000,
        cache_write_tokens=1000,
        reported=True,
        complete=False,
        response_model=CLAUDE,
    )


def test_anthropic_error_event_means_not_complete() -> None:
    body = anthropic_stream({"output_tokens": 15}, stop=False) + sse(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        event_names=["error"],
    )
    usage = meter(ANTHROPIC, SSE, body)
    assert usage.reported
    assert not usage.complete
    assert usage.output_tokens == 15


def test_anthropic_stream_without_event_lines() -> None:
    body = b"".join(
        line
        for line in anthropic_stream({"output_tokens": 15}).splitlines(keepends=True)
        if b"event:" not in line
    )
    assert meter(ANTHROPIC, SSE, body) == ANTHROPIC_EXPECTED


def test_anthropic_json() -> None:
    body = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": CLAUDE,
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {**START_USAGE, "output_tokens": 15, "service_tier": "standard"},
    }
    assert meter(ANTHROPIC, JSON, json.dumps(body).encode()) == ANTHROPIC_EXPECTED


def test_anthropic_count_tokens_is_not_billable_usage() -> None:
    usage = meter(ANTHROPIC, JSON, b'{"input_tokens": 2095}')
    assert not usage.reported
    assert usage.input_tokens == 0
    assert usage.complete


# -- Gemini ---------------------------------------------------------------------------------------------

GEMINI_MODEL = "gemini-2.5-flash"


def gemini_chunk(text: str, meta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": meta,
        "modelVersion": GEMINI_MODEL,
        "responseId": "r1",
    }


GEMINI_CHUNKS = [
    gemini_chunk(
        'He said "[}{" \\ ok',
        {
            "promptTokenCount": 1000,
            "candidatesTokenCount": 5,
            "totalTokenCount": 1005,
            "cachedContentTokenCount": 800,
        },
    ),
    gemini_chunk(
        " world",
        {
            "promptTokenCount": 1000,
            "candidatesTokenCount": 40,
            "totalTokenCount": 1147,
            "cachedContentTokenCount": 800,
            "thoughtsTokenCount": 100,
            "toolUsePromptTokenCount": 7,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1000}],
        },
        finish="STOP",
    ),
]
GEMINI_EXPECTED = Usage(
    input_tokens=207,
    output_tokens=140,
    cache_read_tokens=800,
    reasoning_tokens=100,
    reported=True,
    complete=True,
    response_model=GEMINI_MODEL,
)
GEMINI_SSE = sse(*GEMINI_CHUNKS, eol="\r\n")
GEMINI_ARRAY = ("[" + "\r\n,".join(json.dumps(c, indent=2) for c in GEMINI_CHUNKS) + "\r\n]").encode()


def test_gemini_sse() -> None:
    assert meter(GEMINI, SSE, GEMINI_SSE) == GEMINI_EXPECTED


def test_gemini_json_array() -> None:
    assert meter(GEMINI, ARRAY, GEMINI_ARRAY) == GEMINI_EXPECTED


def test_gemini_json() -> None:
    assert meter(GEMINI, JSON, json.dumps(GEMINI_CHUNKS[1]).encode()) == GEMINI_EXPECTED


def test_gemini_whole_array_read_as_json() -> None:
    assert meter(GEMINI, JSON, GEMINI_ARRAY) == GEMINI_EXPECTED


@pytest.mark.parametrize(("fmt", "body"), [(SSE, GEMINI_SSE), (ARRAY, GEMINI_ARRAY)])
def test_gemini_interrupted_keeps_last_usage_seen(fmt: StreamFormat, body: bytes) -> None:
    cut = body.index(b" world") - 30
    usage = meter(GEMINI, fmt, body[:cut])
    assert usage == Usage(
        input_tokens=200, output_tokens=5, cache_read_tokens=800, reported=True, response_model=GEMINI_MODEL
    )


def test_gemini_error_element_means_not_complete() -> None:
    error = {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}
    body = b"[" + json.dumps(GEMINI_CHUNKS[0]).encode() + b",\n" + json.dumps(error).encode()
    usage = meter(GEMINI, ARRAY, body)
    assert usage.reported
    assert not usage.complete


def test_gemini_blocked_prompt_is_complete() -> None:
    body = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9}}
    usage = meter(GEMINI, SSE, sse(body))
    assert usage.complete
    assert usage.input_tokens == 9


def test_gemini_count_tokens_is_not_usage() -> None:
    usage = meter(GEMINI, JSON, b'{"totalTokens": 31, "promptTokensDetails": []}')
    assert not usage.reported
    assert usage.complete


# -- limits and garbage ---------------------------------------------------------------------------------


def test_json_body_over_max_buffer_gives_up() -> None:
    body = json.dumps({"usage": CHAT_USAGE, "pad": "x" * 200}).encode()
    usage = meter(OPENAI, JSON, body[:100], body[100:], max_buffer=150)
    assert usage == Usage()


def test_sse_event_over_max_buffer_keeps_earlier_usage() -> None:
    body = anthropic_stream(stop=False) + sse({"type": "content_block_delta", "text": "x" * 500})
    body += anthropic_stream({"output_tokens": 99})
    usage = meter(ANTHROPIC, SSE, body, max_buffer=400)
    assert usage.reported
    assert usage.output_tokens == 1
    assert not usage.complete


def test_array_element_over_max_buffer_keeps_earlier_usage() -> None:
    big = gemini_chunk("x" * 2000, {"promptTokenCount": 5000}, finish="STOP")
    body = b"[" + json.dumps(GEMINI_CHUNKS[0]).encode() + b",\n" + json.dumps(big).encode() + b"]"
    usage = meter(GEMINI, ARRAY, body, max_buffer=1000)
    assert usage.input_tokens == 200
    assert not usage.complete


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"null",
        b'{"usage": [1, 2]}',
        b'{"usage": {"prompt_tokens": "12", "completion_tokens": -4}}',
        b'{"usageMetadata": {"promptTokenCount": 1.5}}',
        b"[" * 100_000,
        b'data: {"usage": {"prompt_tokens": true}}\n\n',
        b"\xff\xfe\x00",
    ],
)
@pytest.mark.parametrize("kind", list(ProviderKind))
@pytest.mark.parametrize("fmt", list(StreamFormat))
def test_garbage_never_raises(body: bytes, kind: ProviderKind, fmt: StreamFormat) -> None:
    usage = meter(kind, fmt, body)
    assert usage.input_tokens == usage.output_tokens == 0
    assert not usage.reported


def test_bool_and_negative_counts_are_ignored() -> None:
    body = b'{"usage": {"prompt_tokens": true, "completion_tokens": -4, "prompt_tokens_details": null}}'
    usage = meter(OPENAI, JSON, body)
    assert not usage.reported
    assert usage.input_tokens == 0
    assert usage.output_tokens == 0
    body = b'{"usage": {"prompt_tokens": 7, "completion_tokens": false}}'
    usage = meter(OPENAI, JSON, body)
    assert usage.reported
    assert usage.input_tokens == 7
    assert usage.output_tokens == 0


def test_cached_larger_than_prompt_never_goes_negative() -> None:
    body = b'{"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}}}'
    usage = meter(OPENAI, JSON, body)
    assert usage.input_tokens == 0
    assert usage.cache_read_tokens == 5


def test_finish_is_idempotent_and_feed_after_finish_is_an_error() -> None:
    m = UsageMeter(OPENAI, SSE)
    m.feed(CHAT_STREAM)
    assert m.finish() is m.finish()
    with pytest.raises(RuntimeError):
        m.feed(b"data: [DONE]\n\n")


@settings(max_examples=examples(100), deadline=None)
@given(kind=st.sampled_from(list(ProviderKind)), fmt=st.sampled_from(list(StreamFormat)), data=st.binary())
def test_random_bytes_never_raise(kind: ProviderKind, fmt: StreamFormat, data: bytes) -> None:
    meter(kind, fmt, data)


# -- split invariance -----------------------------------------------------------------------------------

FIXTURES = [
    (OPENAI, SSE, CHAT_STREAM),
    (OPENAI, SSE, RESPONSES_STREAM),
    (ANTHROPIC, SSE, anthropic_stream({"output_tokens": 10}, {"input_tokens": 30, "output_tokens": 15})),
    (GEMINI, SSE, GEMINI_SSE),
    (GEMINI, ARRAY, GEMINI_ARRAY),
    (OPENAI, JSON, json.dumps(response_obj("completed", RESPONSES_USAGE)).encode()),
]


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=examples(300), deadline=None)
@given(
    fixture=st.sampled_from(FIXTURES),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    truncate=st.none() | st.integers(min_value=0),
)
def test_any_split_gives_the_same_usage(
    fixture: tuple[ProviderKind, StreamFormat, bytes], cuts: list[int], truncate: int | None
) -> None:
    kind, fmt, stream = fixture
    if truncate is not None:
        stream = stream[: truncate % (len(stream) + 1)]
    whole = meter(kind, fmt, stream)
    assert meter(kind, fmt, *_split(stream, cuts)) == whole
    assert meter(kind, fmt, *(stream[i : i + 1] for i in range(len(stream)))) == whole


def _fields(usage: Usage) -> dict[str, Any]:
    return {name: getattr(usage, name) for name in Usage.__slots__}
