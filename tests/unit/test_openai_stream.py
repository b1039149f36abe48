"""OpenAI include_usage injection: the request rewrite and the byte-exact stripping of what it adds."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.errors import UpstreamProtocolError
from trioproxy.openai_stream import UsageChunkStripper, prepare_stream_usage
from trioproxy.snapshot import ProviderKind
from trioproxy.usage import StreamFormat, UsageMeter

# -- prepare_stream_usage -------------------------------------------------------------------------------


def test_stream_without_options_gets_include_usage() -> None:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    original = copy.deepcopy(body)
    prepared, client_asked = prepare_stream_usage(body)
    assert prepared == {**original, "stream_options": {"include_usage": True}}
    assert client_asked is False
    assert body == original  # the caller's dict is untouched


def test_other_stream_options_are_kept() -> None:
    body = {"stream": True, "stream_options": {"include_obfuscation": False}}
    prepared, client_asked = prepare_stream_usage(body)
    assert prepared["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["stream_options"] == {"include_obfuscation": False}
    assert client_asked is False


@pytest.mark.parametrize("options", [None, {"include_usage": False}])
def test_null_or_false_options_are_turned_on(options: Any) -> None:
    prepared, client_asked = prepare_stream_usage({"stream": True, "stream_options": options})
    assert prepared["stream_options"]["include_usage"] is True
    assert client_asked is False


def test_client_that_asked_is_unchanged() -> None:
    body = {"stream": True, "stream_options": {"include_usage": True}}
    assert prepare_stream_usage(body) == (body, True)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o"},
        {"stream": False},
        {"stream": "true"},  # not a JSON true: the provider decides what it means
        {"stream": True, "stream_options": "yes"},  # malformed: left for the provider to reject
    ],
)
def test_bodies_left_alone(body: dict[str, Any]) -> None:
    prepared, client_asked = prepare_stream_usage(body)
    assert prepared is body
    assert client_asked is True


# -- UsageChunkStripper ---------------------------------------------------------------------------------


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def chunk(
    delta: dict[str, Any], *, finish: str | None = None, usage: bool = True, obfuscation: bool = False
) -> str:
    obj: dict[str, Any] = {
        "id": "chatcmpl-B9",
        "object": "chat.completion.chunk",
        "created": 1741000000,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        obj["usage"] = None
    if obfuscation:
        obj["obfuscation"] = "x7Yq"
    return dumps(obj)


USAGE_CHUNK = dumps(
    {
        "id": "chatcmpl-B9",
        "object": "chat.completion.chunk",
        "created": 1741000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
)
DELTAS: list[tuple[dict[str, Any], str | None]] = [
    ({"role": "assistant", "content": "", "refusal": None}, None),
    ({"content": 'say "usage":null twice: "usage":null'}, None),
    ({}, "stop"),
]


def stream(*, usage: bool, obfuscation: bool = False, eol: str = "\n") -> bytes:
    events = [chunk(d, finish=f, usage=usage, obfuscation=obfuscation) for d, f in DELTAS]
    if usage:
        events.append(USAGE_CHUNK)
    events.append("[DONE]")
    return "".join(f"data: {e}{eol}{eol}" for e in events).encode()


def strip(*chunks: bytes) -> bytes:
    stripper = UsageChunkStripper()
    return b"".join(stripper.feed(c)[0] for c in chunks) + stripper.flush()[0]


@pytest.mark.parametrize("obfuscation", [False, True])
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_stripped_stream_is_what_the_client_would_have_got(obfuscation: bool, eol: str) -> None:
    with_usage = stream(usage=True, obfuscation=obfuscation, eol=eol)
    assert strip(with_usage) == stream(usage=False, obfuscation=obfuscation, eol=eol)


def test_meter_still_reads_usage_from_the_unstripped_bytes() -> None:
    meter = UsageMeter(ProviderKind.OPENAI, StreamFormat.SSE)
    meter.feed(stream(usage=True))
    usage = meter.finish()
    assert (usage.input_tokens, usage.output_tokens, usage.complete) == (9, 2, True)


@pytest.mark.parametrize("split", [1, 7, 64, 10_000])
def test_meter_reads_the_events_the_stripper_framed(split: int) -> None:
    """The relay frames an OpenAI stream once: the stripper's events feed the meter, unrewritten."""
    data = stream(usage=True)
    stripper = UsageChunkStripper()
    meter = UsageMeter(ProviderKind.OPENAI, StreamFormat.SSE, framed_elsewhere=True)
    sent = b""
    for start in range(0, len(data), split):
        out, events = stripper.feed(data[start : start + split])
        meter.feed_events(events)
        sent += out
    tail, events = stripper.flush()
    meter.feed_events(events)
    sent += tail
    usage = meter.finish()
    assert (usage.input_tokens, usage.output_tokens, usage.complete) == (9, 2, True)
    assert sent == stream(usage=False)
    assert meter.generated_chars > 0
    with pytest.raises(RuntimeError):
        meter.feed_events([])


@pytest.mark.parametrize(
    "event",
    [
        b": keep-alive\n\n",
        b"data: [DONE]\n\n",
        b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n',
        b'event: usage\ndata: {"usage":null}\n\n',  # two lines: not the chunk shape we rewrite
        b'data: {"id":"x","usage": null}\n\n',  # another serialization
        b'data: {"id":"x","meta":{"usage":null},"usage":{"total_tokens":3},"choices":[{}]}\n\n',
        b'data: {"id":"x","meta":{"usage":null,"a":1}}\n\n',  # nested, and no top-level usage
        b'data: {"id":"x","usage":null\n\n',  # not JSON
        b"data: usage\n\n",
        b'\xef\xbb\xbfdata: {"usage":null}\n\n',
    ],
)
def test_everything_else_passes_through_byte_identical(event: bytes) -> None:
    assert strip(event) == event


def test_nested_null_usage_stays_when_top_level_one_is_removed() -> None:
    event = b'data: {"meta":{"usage":null,"a":1},"usage":null,"obfuscation":"q"}\n\n'
    assert strip(event) == b'data: {"meta":{"usage":null,"a":1},"obfuscation":"q"}\n\n'


def test_empty_choices_with_null_usage_is_not_the_usage_chunk() -> None:
    # e.g. Azure's first chunk, which carries prompt_filter_results and no choices
    event = b'data: {"id":"","choices":[],"prompt_filter_results":[],"usage":null}\n\n'
    assert strip(event) == b'data: {"id":"","choices":[],"prompt_filter_results":[]}\n\n'


def test_first_member_null_usage() -> None:
    assert strip(b'data: {"usage":null,"id":"x"}\n\n') == b'data: {"id":"x"}\n\n'


def test_usage_chunk_is_dropped() -> None:
    assert strip(f"data: {USAGE_CHUNK}\n\n".encode()) == b""


def test_complete_events_are_released_immediately() -> None:
    stripper = UsageChunkStripper()
    first = f"data: {chunk({'content': 'a'})}\n\n".encode()
    assert stripper.feed(first[:10]) == (b"", [])
    assert stripper.feed(first[10:])[0] == f"data: {chunk({'content': 'a'}, usage=False)}\n\n".encode()
    assert stripper.feed(b"data: [DONE]\n\n")[0] == b"data: [DONE]\n\n"
    assert stripper.feed(b'data: {"unfinished') == (b"", [])
    assert stripper.flush() == (b'data: {"unfinished', [])


def test_oversized_event_raises() -> None:
    stripper = UsageChunkStripper(max_event_bytes=32)
    with pytest.raises(UpstreamProtocolError):
        stripper.feed(b"data: " + b"x" * 40)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=examples(200), deadline=None)
@given(
    obfuscation=st.booleans(),
    eol=st.sampled_from(["\n", "\r\n"]),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    truncate=st.none() | st.integers(min_value=0),
)
def test_any_split_gives_the_same_bytes(
    obfuscation: bool, eol: str, cuts: list[int], truncate: int | None
) -> None:
    data = stream(usage=True, obfuscation=obfuscation, eol=eol)
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    assert strip(*_split(data, cuts)) == strip(data)


_NOISE = st.lists(
    st.sampled_from(
        [b"data: ", b"data:", b": c", b"\n", b"\r\n", b"\r", b"{", b"}", b'"id":1', b",", b"[DONE]"]
    )
    | st.binary(max_size=6),
    max_size=40,
).map(b"".join)


@settings(max_examples=examples(200), deadline=None)
@given(data=_NOISE, cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_streams_without_usage_pass_through_unchanged(data: bytes, cuts: list[int]) -> None:
    if b"usage" in data:
        return
    assert strip(*_split(data, cuts)) == data
