"""SSEFramer: WHATWG line and field rules, byte-exact raw events, any split of the input."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.errors import UpstreamProtocolError
from trioproxy.sse import MAX_EVENT_BYTES, SSEEvent, SSEFramer


def feed_all(chunks: list[bytes], **kwargs: int) -> tuple[list[SSEEvent], bytes]:
    framer = SSEFramer(**kwargs)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    events += framer.flush()
    return events, framer.remainder


def reference(stream: bytes) -> tuple[list[SSEEvent], bytes]:
    """An independent whole-input reading of the same rules, used as the oracle."""
    events: list[SSEEvent] = []
    start = pos = 0
    data: list[str] = []
    event = ident = None
    retry = None
    fields = has_data = False
    first = True
    for m in re.finditer(rb"\r\n|\r|\n", stream):
        line = stream[pos : m.start()].decode("utf-8", "replace")
        pos = m.end()
        if first:
            first = False
            line = line.removeprefix("\ufeff")
        if not line:
            events.append(
                SSEEvent(stream[start:pos], event, "\n".join(data), ident, retry, not fields, has_data)
            )
            start = pos
            data, event, ident, retry, fields, has_data = [], None, None, None, False, False
            continue
        if line.startswith(":"):
            continue
        fields = True
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
            has_data = True
        elif name == "event":
            event = value or None
        elif name == "id" and "\x00" not in value:
            ident = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)
    return events, stream[start:]


def test_openai_style_events() -> None:
    stream = b'data: {"a":1}\n\ndata: [DONE]\n\n'
    events, rest = feed_all([stream])
    assert [e.data for e in events] == ['{"a":1}', "[DONE]"]
    assert [e.raw for e in events] == [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]
    assert all(e.event is None and e.has_data and not e.is_comment_only for e in events)
    assert rest == b""


def test_named_event_id_retry_and_multiline_data() -> None:
    stream = b"event: message_start\nid: 7\nretry: 1500\ndata: one\ndata:two\ndata\n\n"
    [event], _ = feed_all([stream])
    assert event.event == "message_start"
    assert event.id == "7"
    assert event.retry == 1500
    assert event.data == "one\ntwo\n"  # "data" without a colon is a data field with an empty value


def test_field_rules() -> None:
    stream = b"id: a\x00b\nretry: 12x\nevent:\nunknown: x\ndata:  two spaces\n\n"
    [event], _ = feed_all([stream])
    assert event.id is None  # an id containing NUL is ignored
    assert event.retry is None  # a non-digit retry is ignored
    assert event.event is None  # empty event type means the default
    assert event.data == " two spaces"  # only one leading space is removed


def test_comments_and_blank_blocks_are_reported() -> None:
    stream = b": keep-alive\n\n\nevent: ping\n\n"
    events, _ = feed_all([stream])
    assert [e.raw for e in events] == [b": keep-alive\n\n", b"\n", b"event: ping\n\n"]
    assert [e.is_comment_only for e in events] == [True, True, False]
    assert [e.has_data for e in events] == [False, False, False]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = b"data: x" + eol + b"data: y" + eol + eol + b"data: z" + eol + eol
    events, rest = feed_all([stream])
    assert [e.data for e in events] == ["x\ny", "z"]
    assert b"".join(e.raw for e in events) == stream
    assert rest == b""


def test_crlf_split_across_feeds_is_one_line_ending() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: x\r") == []
    assert framer.feed(b"\n\r") == []  # the CR may still be the first half of a CRLF
    [event] = framer.feed(b"\n")
    assert event.raw == b"data: x\r\n\r\n"
    assert event.data == "x"


def test_lf_and_crlf_events_are_emitted_as_soon_as_complete() -> None:
    framer = SSEFramer()
    assert [e.data for e in framer.feed(b"data: a\n\n")] == ["a"]
    assert [e.data for e in framer.feed(b"data: b\r\n\r\n")] == ["b"]


def test_final_bare_cr_is_completed_by_flush() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: x\r\r") == []
    [event] = framer.flush()
    assert event.raw == b"data: x\r\r"
    assert framer.remainder == b""


def test_unterminated_tail_is_remainder_not_event() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\n\ndata: b\n") != []
    assert framer.flush() == []
    assert framer.remainder == b"data: b\n"


def test_bom_only_at_stream_start() -> None:
    framer = SSEFramer()
    events = framer.feed(b"\xef\xbb")
    events += framer.feed(b"\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert events[0].data == "a"
    assert events[0].raw.startswith(b"\xef\xbb\xbf")
    assert events[1].data == ""  # a second BOM is part of the field name, which is then unknown
    assert not events[1].has_data


def test_invalid_utf8_is_replaced() -> None:
    [event], _ = feed_all([b"data: \xff\xfe\n\n"])
    assert event.data == "\ufffd\ufffd"


def test_event_over_limit_raises_when_complete() -> None:
    framer = SSEFramer(max_event_bytes=16)
    with pytest.raises(UpstreamProtocolError):
        framer.feed(b"data: 0123456789\n\n")  # 18 bytes


def test_unterminated_event_over_limit_raises_while_buffering() -> None:
    framer = SSEFramer(max_event_bytes=16)
    framer.feed(b"data: 0123456789")  # 16 bytes: still fine
    with pytest.raises(UpstreamProtocolError) as info:
        framer.feed(b"x")
    assert info.value.status_hint == 502


def test_events_before_an_oversized_one_are_returned_first() -> None:
    framer = SSEFramer(max_event_bytes=16)
    [event] = framer.feed(b"data: a\n\ndata: 0123456789abcdef")
    assert event.data == "a"
    with pytest.raises(UpstreamProtocolError):
        framer.flush()
    with pytest.raises(UpstreamProtocolError):
        framer.feed(b"\n\n")


def test_event_at_limit_is_fine() -> None:
    framer = SSEFramer(max_event_bytes=18)
    assert len(framer.feed(b"data: 0123456789\n\n")) == 1


def test_default_limit_is_one_mib() -> None:
    assert MAX_EVENT_BYTES == 1024 * 1024
    framer = SSEFramer()
    framer.feed(b"data: " + b"x" * (MAX_EVENT_BYTES - 6))
    with pytest.raises(UpstreamProtocolError):
        framer.feed(b"x")


def test_feed_after_flush_is_an_error() -> None:
    framer = SSEFramer()
    framer.flush()
    with pytest.raises(RuntimeError):
        framer.feed(b"data: x\n\n")


# Pieces that exercise every rule: line endings, BOMs, comments, fields with and without colons, UTF-8.
_PIECES = st.sampled_from(
    [
        b"data: x",
        b"data:y",
        b"data",
        b"event: e",
        b"event:",
        b"id: 1",
        b"id: \x00",
        b"retry: 30",
        b"retry: x",
        b": comment",
        b":",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n",
        b"\xef\xbb\xbf",
        b"\xc3\xa9",
        b"\xff",
        b" ",
        b"foo: bar",
    ]
)
_STREAMS = st.lists(_PIECES | st.binary(max_size=4), max_size=40).map(b"".join)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=examples(400), deadline=None)
@given(stream=_STREAMS, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_gives_the_same_events(stream: bytes, cuts: list[int]) -> None:
    whole = feed_all([stream])
    assert whole == reference(stream)
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == whole
    assert feed_all(_split(stream, cuts)) == whole


@settings(max_examples=examples(300), deadline=None)
@given(stream=_STREAMS, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_raw_events_and_remainder_reproduce_the_input(stream: bytes, cuts: list[int]) -> None:
    events, rest = feed_all(_split(stream, cuts))
    assert b"".join(e.raw for e in events) + rest == stream


@settings(max_examples=examples(200), deadline=None)
@given(stream=_STREAMS, cuts=st.lists(st.integers(min_value=0), max_size=8), limit=st.integers(1, 40))
def test_limit_decision_does_not_depend_on_splits(stream: bytes, cuts: list[int], limit: int) -> None:
    def outcome(chunks: list[bytes]) -> object:
        try:
            return feed_all(chunks, max_event_bytes=limit)
        except UpstreamProtocolError:
            return "too big"

    assert outcome(_split(stream, cuts)) == outcome([stream])
