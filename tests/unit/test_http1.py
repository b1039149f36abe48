"""trioproxy.http1: response heads, framing rules, body decoding and serializers, checked against h11.

h11 was the data plane's HTTP/1.1 implementation before this module replaced it on the hot path, so it is the
oracle: whatever valid response h11 reads, the sans-IO functions must read the same (status, headers, body,
and the bytes left after the message), however the bytes are split into receives.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.http1 import (
    CONTINUE_RESPONSE,
    LAST_CHUNK,
    MAX_CHUNK_LINE,
    BodyDecoder,
    Framing,
    HTTPFramingError,
    ResponseHead,
    check_header_values,
    chunk,
    content_length,
    has_connection_token,
    parse_response_head,
    request_framing,
    response_framing,
    serialize_request_head,
    serialize_response_head,
)

MAX_HEAD = 64 * 1024
Headers = list[tuple[bytes, bytes]]


class Decoded(NamedTuple):
    """A response as read: head fields, the decoded body, and whatever followed the message."""

    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    body: bytes
    trailing: bytes


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets, never into empty pieces (an empty receive would mean EOF to h11)."""
    points = [0, *sorted({cut for cut in cuts if 0 < cut < len(data)}), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(points)]


def read_response(pieces: list[bytes], method: bytes = b"GET", max_bytes: int = MAX_HEAD) -> Decoded:
    """Read a response from ``pieces`` the way upstream_conn does, then EOF."""
    buffer = b""
    head: ResponseHead | None = None
    decoder: BodyDecoder | None = None
    body: list[bytes] = []
    for piece in pieces:
        if decoder is None:
            buffer += piece
            parsed = parse_response_head(buffer, max_bytes)
            if parsed is None:
                continue
            head, consumed = parsed
            framing, length = response_framing(method, head.status, head.headers)
            decoder = BodyDecoder(framing, length)
            piece = buffer[consumed:]
        body.append(decoder.feed(piece))
    assert head is not None and decoder is not None, "the response head never completed"
    if not decoder.done:
        decoder.close()
    assert decoder.done
    return Decoded(
        head.status, head.reason, head.http_version, head.headers, b"".join(body), decoder.trailing
    )


def h11_response(pieces: list[bytes], method: bytes = b"GET") -> Decoded:
    """The oracle: an h11 client that sent ``method /`` reads the same pieces (then EOF if it still needs to)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "upstream.test")]))
    conn.send(h11.EndOfMessage())
    response: h11.Response | None = None
    body = b""
    ended = False

    def drain() -> None:
        nonlocal response, body, ended
        while not ended:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                ended = True
            else:
                raise AssertionError(f"unexpected h11 event {event!r}")

    for piece in pieces:
        conn.receive_data(piece)
        drain()
    if not ended:
        conn.receive_data(b"")
        drain()
    assert response is not None and ended
    return Decoded(
        response.status_code,
        bytes(response.reason),
        bytes(response.http_version),
        [(bytes(name), bytes(value)) for name, value in response.headers],
        body,
        conn.trailing_data[0],
    )


def decode_body(framing: Framing, pieces: list[bytes], length: int = 0) -> tuple[bytes, BodyDecoder]:
    decoder = BodyDecoder(framing, length)
    out = b"".join(decoder.feed(piece) for piece in pieces)
    return out, decoder


def framing_error(call: Callable[..., object], *args: object) -> HTTPFramingError:
    """The HTTPFramingError that ``call(*args)`` raises (failing the test if it returns)."""
    with pytest.raises(HTTPFramingError) as info:
        call(*args)
    return info.value


def h11_refuses_head(data: bytes) -> bool:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "upstream.test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return True
    return not isinstance(event, h11.Response | h11.InformationalResponse)


# -- parse_response_head: valid heads -------------------------------------------------------------------------


def test_complete_head_is_parsed_and_the_body_left_alone() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-ID:abc\r\n\r\n"
    parsed = parse_response_head(head + b'{"a": 1}\r\n\r\nHTTP/1.1 500 X\r\n\r\n', MAX_HEAD)
    assert parsed == (
        ResponseHead(200, b"OK", b"1.1", [(b"content-type", b"application/json"), (b"x-request-id", b"abc")]),
        len(head),
    )


def test_head_is_none_on_every_proper_prefix() -> None:
    data = b"HTTP/1.1 404 Not Found\r\nServer: x\r\nContent-Length: 0\r\n\r\n"
    for end in range(len(data)):
        assert parse_response_head(data[:end], MAX_HEAD) is None, end
    assert parse_response_head(data, MAX_HEAD) is not None
    assert parse_response_head(bytearray(data), MAX_HEAD) == parse_response_head(data, MAX_HEAD)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\nA: b\nC: d\n\n",
        b"HTTP/1.1 200 OK\r\nA: b\nC: d\r\n\n",
        b"HTTP/1.1 200 OK\nA: b\r\nC: d\n\r\n",
    ],
    ids=["bare_lf", "mixed_1", "mixed_2"],
)
def test_bare_lf_and_mixed_line_endings_are_accepted(data: bytes) -> None:
    parsed = parse_response_head(data + b"rest", MAX_HEAD)
    assert parsed == (ResponseHead(200, b"OK", b"1.1", [(b"a", b"b"), (b"c", b"d")]), len(data))
    assert h11_response([data], b"HEAD").headers == [(b"a", b"b"), (b"c", b"d")]


@pytest.mark.parametrize(
    ("status_line", "status", "reason", "version"),
    [
        (b"HTTP/1.1 200 OK", 200, b"OK", b"1.1"),
        (b"HTTP/1.1 200", 200, b"", b"1.1"),
        (b"HTTP/1.1 200 ", 200, b"", b"1.1"),
        (b"HTTP/1.0 503 Service  Unavailable \t", 503, b"Service  Unavailable \t", b"1.0"),
        (b"HTTP/1.1 299 caf\xc3\xa9 \x80\xff", 299, b"caf\xc3\xa9 \x80\xff", b"1.1"),
        (b"HTTP/1.1 100 Continue", 100, b"Continue", b"1.1"),
    ],
)
def test_status_line_reason_present_absent_or_empty(
    status_line: bytes, status: int, reason: bytes, version: bytes
) -> None:
    parsed = parse_response_head(status_line + b"\r\n\r\n", MAX_HEAD)
    assert parsed is not None
    head, _ = parsed
    assert (head.status, head.reason, head.http_version, head.headers) == (status, reason, version, [])
    if status >= 200:
        oracle = h11_response([status_line + b"\r\n\r\n"], b"HEAD")
        assert (oracle.status, oracle.reason, oracle.http_version) == (status, reason, version)


def test_names_are_lower_cased_and_values_stripped_of_ows_only() -> None:
    data = b"HTTP/1.1 200 OK\r\nX-MiXeD:  \t a \t b\t \r\nEmpty:\r\nBlank:  \t \r\nObs: \x80\xfe\r\n\r\n"
    parsed = parse_response_head(data, MAX_HEAD)
    assert parsed is not None
    expected = [(b"x-mixed", b"a \t b"), (b"empty", b""), (b"blank", b""), (b"obs", b"\x80\xfe")]
    assert parsed[0].headers == expected
    assert h11_response([data], b"HEAD").headers == expected


def test_continue_response_constant_is_an_interim_head() -> None:
    assert parse_response_head(CONTINUE_RESPONSE, MAX_HEAD) == (
        ResponseHead(100, b"Continue", b"1.1", []),
        len(CONTINUE_RESPONSE),
    )
    assert response_framing(b"POST", 100, []) == (Framing.NONE, 0)


# -- parse_response_head: refusals ----------------------------------------------------------------------------

MALFORMED_STATUS_LINES = [
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 200OK",
    b"HTTP/1.1  200 OK",
    b"HTTP/1.1\t200 OK",
    b" HTTP/1.1 200 OK",
    b"http/1.1 200 OK",
    b"HTTP/11 200 OK",
    b"HTTP/1.1 abc OK",
    b"HTTP/1.1 -20 OK",
    b"ICY 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 OK\r",
    b"",
]


@pytest.mark.parametrize("status_line", MALFORMED_STATUS_LINES)
def test_malformed_status_lines_are_refused_as_h11_does(status_line: bytes) -> None:
    data = status_line + b"\r\nContent-Length: 0\r\n\r\n"
    error = framing_error(parse_response_head, data, MAX_HEAD)
    assert error.status_hint == 400
    assert h11_refuses_head(data)


# Regression: a status below 100 (b"HTTP/1.1 000 X", "099") was accepted and then skipped like a 1xx; h11
# refuses it, and so do we (status codes are 100-599, RFC 9110 section 15).
@pytest.mark.parametrize("status", [b"000", b"042", b"099"])
def test_status_below_100_is_refused_as_h11_does(status: bytes) -> None:
    data = b"HTTP/1.1 " + status + b" X\r\n\r\n"
    assert h11_refuses_head(data)
    framing_error(parse_response_head, data, MAX_HEAD)


def test_del_in_the_reason_is_refused_though_h11_allows_it() -> None:
    data = b"HTTP/1.1 200 O\x7fK\r\n\r\n"  # RFC 9112 reason-phrase: HTAB, SP, VCHAR (0x21-0x7E), obs-text
    assert framing_error(parse_response_head, data, MAX_HEAD).message == "malformed status line"
    assert not h11_refuses_head(data)


MALFORMED_HEADER_LINES = {
    "space_in_name": b"X Y: z",
    "space_before_colon": b"X : z",
    "empty_name": b": z",
    "no_colon": b"XYZ",
    "paren_in_name": b"X(Y): z",
    "at_in_name": b"X@Y: z",
    "nul_in_name": b"X\x00: z",
    "non_ascii_name": b"caf\xc3\xa9: z",
    "tab_in_name": b"X\tY: z",
    "nul_in_value": b"X: a\x00b",
    "vt_in_value": b"X: a\x0bb",
    "bare_cr_in_value": b"X: a\rb",
}


@pytest.mark.parametrize("line", list(MALFORMED_HEADER_LINES.values()), ids=list(MALFORMED_HEADER_LINES))
def test_malformed_header_lines_are_refused_as_h11_does(line: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\nA: b\r\n" + line + b"\n\r\n"
    assert framing_error(parse_response_head, data, MAX_HEAD).status_hint == 400
    assert h11_refuses_head(data)


@pytest.mark.parametrize("value", [b"\x01", b"a\x7f", b"\x1b[31m", b"a\x08b", b"\x1f"])
def test_control_characters_h11_lets_through_are_refused(value: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\nX: " + value + b"\r\n\r\n"
    assert framing_error(parse_response_head, data, MAX_HEAD).message == "control character in a header value"
    assert not h11_refuses_head(data)  # h11 only refuses NUL and whitespace controls in values


def test_bare_cr_before_a_line_end_is_refused_in_any_header_line() -> None:
    for data in (
        b"HTTP/1.1 200 OK\r\nX: a\r\r\nY: b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\r\nY: b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\r\r\n\r\n",
    ):
        framing_error(parse_response_head, data, MAX_HEAD)
        assert h11_refuses_head(data)


# Regression: one stray CR right before the CR LF CR LF that ends the head was silently dropped (the end-of-head
# pattern matched from the second CR); a bare CR is refused wherever it is, as h11 does.
@pytest.mark.parametrize("data", [b"HTTP/1.1 200 OK\r\nX: a\r\r\n\r\n", b"HTTP/1.1 200 OK\r\r\n\r\n"])
def test_bare_cr_before_the_blank_line_is_refused(data: bytes) -> None:
    assert h11_refuses_head(data)
    framing_error(parse_response_head, data, MAX_HEAD)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n\tb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n X-A: a\r\n\r\n",
        b"HTTP/1.1 200 OK\nX-A: a\n   \nX-B: b\n\n",
    ],
)
def test_obs_fold_is_refused_even_though_h11_unfolds(data: bytes) -> None:
    error = framing_error(parse_response_head, data, MAX_HEAD)
    assert error.message == "obsolete line folding"


def test_errors_never_quote_the_bytes() -> None:
    secret = b"sk-live-0123456789"
    for data in (
        b"HTTP/1.1 200 " + secret + b"\x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nAuthorization: " + secret + b"\x01\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Key: a\r\n " + secret + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Key: " + secret * 10,
    ):
        error = framing_error(parse_response_head, data, 64)
        assert secret.decode() not in str(error)
        assert secret.decode() not in repr(error)


# -- parse_response_head: the size limit ----------------------------------------------------------------------


def head_of(content_size: int, terminator: bytes = b"\r\n\r\n") -> bytes:
    """A head whose bytes before the blank line number exactly ``content_size``, then ``terminator``."""
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    return start + b"p" * (content_size - len(start)) + terminator


def test_head_within_the_limit_is_accepted() -> None:
    data = head_of(100)
    assert parse_response_head(data, 100) == (ResponseHead(200, b"OK", b"1.1", [(b"x-pad", b"p" * 76)]), 104)
    assert parse_response_head(data[:50], 100) is None
    assert parse_response_head(data[:100], 100) is None


def test_complete_but_too_large_head_is_refused_with_431() -> None:
    for data in (head_of(101), head_of(500), head_of(500) + b"body"):
        error = framing_error(parse_response_head, data, 100)
        assert error.status_hint == 431


def test_incomplete_and_too_large_head_is_refused_with_431() -> None:
    data = head_of(500)
    for end in (104, 200, 499):
        error = framing_error(parse_response_head, data[:end], 100)
        assert error.status_hint == 431
    assert framing_error(parse_response_head, b"x" * 104, 100).status_hint == 431  # not even a status line


# Regression: whether a head near the limit was accepted depended on how its bytes were split into receives
# (an incomplete buffer was refused past max_bytes, a complete head allowed max_bytes + 4).
@pytest.mark.parametrize("terminator", [b"\r\n\r\n", b"\n\n"])
def test_a_head_accepted_whole_is_accepted_however_it_arrives(terminator: bytes) -> None:
    data = head_of(100, terminator)
    assert parse_response_head(data, 100) is not None
    for end in range(len(data)):
        assert parse_response_head(data[:end], 100) is None, f"prefix of {end} bytes"


@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=300), max_size=6))
@settings(max_examples=examples(300))
def test_any_bytes_end_in_a_head_a_refusal_or_a_wait_whatever_the_split(data: bytes, cuts: list[int]) -> None:
    def outcome(buffer: bytes) -> tuple[ResponseHead, int] | int | None:
        try:
            return parse_response_head(buffer, 1000)
        except HTTPFramingError as exc:
            return exc.status_hint

    whole = outcome(data)
    buffer = b""
    result: tuple[ResponseHead, int] | int | None = None
    for piece in split(data, cuts):
        buffer += piece
        result = outcome(buffer)
        if result is not None:
            break
    assert result == whole
    if isinstance(whole, int):
        assert whole == 400


_HEAD_JUNK = st.lists(
    st.sampled_from(
        [b"a", b"B", b"-", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x7f", b"\x80", b"("]
    ),
    max_size=30,
).map(b"".join)


@given(_HEAD_JUNK)
@settings(max_examples=examples(300))
def test_what_parse_response_head_accepts_h11_reads_the_same(junk: bytes) -> None:
    # A CR right before the final CR LF CR LF is the known bug of test_bare_cr_before_the_blank_line_is_refused;
    # kept out here so this property does not fail at random on it.
    data = b"HTTP/1.1 200 OK\r\nA: b\r\n" + junk.rstrip(b"\r") + b"\r\n\r\n"
    try:
        parsed = parse_response_head(data, MAX_HEAD)
    except HTTPFramingError:
        return  # stricter than h11 is allowed (obs-fold), never laxer: checked below
    assert parsed is not None
    head, consumed = parsed
    oracle = h11_response([data[:consumed]], b"HEAD")
    assert (oracle.status, oracle.headers) == (head.status, head.headers)


# -- the property against h11 ---------------------------------------------------------------------------------

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Framing and connection headers, and Host (h11 refuses a second one): names the generated headers avoid.
_FRAMING_NAMES = {
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"trailer",
    b"te",
    b"upgrade",
    b"host",
}
_token = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
_name = _token.filter(lambda name: name.lower() not in _FRAMING_NAMES)
_vchar = st.sampled_from([bytes([b]) for b in [*range(0x21, 0x7F), 0x80, 0xC3, 0xFF]])
_word = st.lists(_vchar, min_size=1, max_size=8).map(b"".join)
_ows = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t"])
_value = st.lists(st.tuples(_word, st.sampled_from([b" ", b"\t", b"  "])), max_size=3).map(
    lambda parts: b"".join(word + gap for word, gap in parts).rstrip(b" \t")
)
_eol = st.sampled_from([b"\r\n", b"\n"])
_reason = st.lists(st.sampled_from([b"O", b"k", b" ", b"\t", b"!", b"~", b"\x80", b"\xff"]), max_size=12).map(
    b"".join
)


class Sample(NamedTuple):
    wire: bytes
    method: bytes
    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    body: bytes
    trailing: bytes
    cuts: list[int]


@st.composite
def chunked_bodies(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` in chunks of random sizes, with random size spellings, extensions and trailers."""
    cuts = draw(st.lists(st.integers(min_value=1, max_value=max(1, len(body) - 1)), max_size=5))
    pieces = split(body, cuts) if body else []

    def size_line(size: int) -> bytes:
        digits = b"%x" % size
        if draw(st.booleans()):
            digits = digits.upper()
        digits = b"0" * draw(st.integers(min_value=0, max_value=3)) + digits
        extension = b""
        for name in draw(st.lists(_token, max_size=2)):
            value = draw(st.sampled_from([b"", b"=" + name, b'="q ; x"']))
            extension += b";" + name + value
        return digits + extension + draw(st.sampled_from([b"", b" ", b"\t"])) + b"\r\n"

    wire = b"".join(size_line(len(piece)) + piece + b"\r\n" for piece in pieces)
    wire += size_line(0)
    for name in draw(st.lists(_name, max_size=3)):
        wire += name + b":" + draw(_ows) + draw(_value) + draw(_ows) + b"\r\n"
    return wire + b"\r\n"


@st.composite
def responses(draw: st.DrawFn) -> Sample:
    method = draw(st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"HEAD"]))
    status = draw(st.one_of(st.integers(min_value=200, max_value=599), st.sampled_from([204, 304])))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    reason = draw(st.one_of(st.none(), _reason))
    headers = [(name, draw(_ows), draw(_value), draw(_ows)) for name in draw(st.lists(_name, max_size=6))]
    body = draw(st.binary(max_size=60))
    extra = draw(st.binary(max_size=20))
    kind = draw(st.sampled_from(["length", "chunked", "close"]))
    if kind == "length":
        spelling = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
        value = b"%d" % len(body)
        if draw(st.booleans()):
            value += b", " + value
        framing = [(spelling, value)]
        if draw(st.booleans()):
            framing.append((b"content-length", b"%d" % len(body)))
        encoded = body
    elif kind == "chunked":
        framing = [(draw(st.sampled_from([b"Transfer-Encoding", b"transfer-encoding"])), b"chunked")]
        encoded = draw(chunked_bodies(body))
    else:
        framing, encoded, extra = [], body, b""  # the body runs to EOF: nothing can follow it
    for name, value in framing:
        headers.insert(draw(st.integers(min_value=0, max_value=len(headers))), (name, b" ", value, b""))

    lines = [b"HTTP/" + version + b" %d" % status + (b"" if reason is None else b" " + reason)]
    lines += [name + b":" + before + value + after for name, before, value, after in headers]
    head = b"".join(line + draw(_eol) for line in lines) + draw(_eol)
    wire = head + encoded + extra
    if method == b"HEAD" or status in (204, 304):
        body, extra = b"", encoded + extra  # no body: all of it is left for whoever reads next
    cuts = draw(st.lists(st.integers(min_value=1, max_value=max(1, len(wire) - 1)), max_size=8))
    expected_headers = [(name.lower(), value) for name, _, value, _ in headers]
    return Sample(wire, method, status, reason or b"", version, expected_headers, body, extra, cuts)


def without_framing(headers: Headers) -> Headers:
    """h11 folds repeated Content-Length values into one and lower-cases Transfer-Encoding; compare the rest."""
    return [(name, value) for name, value in headers if name not in (b"content-length", b"transfer-encoding")]


@given(responses())
@settings(max_examples=examples(200))
def test_responses_split_anywhere_read_like_h11(sample: Sample) -> None:
    pieces = split(sample.wire, sample.cuts)
    ours = read_response(pieces, sample.method)
    assert ours == Decoded(
        sample.status,
        sample.reason,
        sample.http_version,
        sample.headers,
        sample.body,
        sample.trailing,
    )
    oracle = h11_response(pieces, sample.method)
    assert (oracle.status, oracle.reason, oracle.http_version) == (
        ours.status,
        ours.reason,
        ours.http_version,
    )
    assert without_framing(oracle.headers) == without_framing(ours.headers)
    assert (oracle.body, oracle.trailing) == (ours.body, ours.trailing)


@given(responses())
@settings(max_examples=examples(50))
def test_responses_fed_one_byte_at_a_time_read_the_same(sample: Sample) -> None:
    whole = read_response([sample.wire], sample.method)
    assert read_response([bytes([byte]) for byte in sample.wire], sample.method) == whole


# -- BodyDecoder: Content-Length, close-delimited, none -------------------------------------------------------


def test_length_body_exact() -> None:
    out, decoder = decode_body(Framing.LENGTH, [b"hello"], 5)
    assert (out, decoder.done, decoder.trailing) == (b"hello", True, b"")
    decoder.close()  # a no-op once done


def test_length_body_in_pieces_is_done_only_at_the_last_byte() -> None:
    decoder = BodyDecoder(Framing.LENGTH, 5)
    assert decoder.feed(b"") == b""
    assert decoder.feed(b"he") == b"he"
    assert not decoder.done
    assert decoder.feed(b"ll") == b"ll"
    assert not decoder.done
    assert decoder.feed(b"o") == b"o"
    assert decoder.done


def test_length_body_cut_short_is_refused_with_502_on_close() -> None:
    decoder = BodyDecoder(Framing.LENGTH, 5)
    assert decoder.feed(b"hell") == b"hell"
    error = framing_error(decoder.close)
    assert error.status_hint == 502
    assert framing_error(BodyDecoder(Framing.LENGTH, 1).close).status_hint == 502


def test_length_body_keeps_extra_bytes_in_trailing() -> None:
    decoder = BodyDecoder(Framing.LENGTH, 5)
    assert decoder.feed(b"hel") == b"hel"
    assert decoder.feed(b"lo GET / HTTP/1.1\r\n") == b"lo"
    assert decoder.trailing == b" GET / HTTP/1.1\r\n"
    assert decoder.feed(b"Host: t\r\n\r\n") == b""
    assert decoder.trailing == b" GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def test_close_delimited_body_ends_on_close() -> None:
    decoder = BodyDecoder(Framing.CLOSE)
    assert decoder.feed(b"any") == b"any"
    assert decoder.feed(b"0\r\n\r\n") == b"0\r\n\r\n"
    assert decoder.feed(b"") == b""
    assert not decoder.done
    decoder.close()
    assert (decoder.done, decoder.trailing) == (True, b"")
    decoder.close()
    assert (decoder.feed(b"late"), decoder.done, decoder.trailing) == (b"", True, b"late")


def test_no_body_is_done_at_once_and_everything_fed_is_trailing() -> None:
    decoder = BodyDecoder(Framing.NONE)
    assert decoder.done
    assert decoder.feed(b"HTTP/1.1 200") == b""
    assert decoder.feed(b" OK\r\n") == b""
    assert decoder.trailing == b"HTTP/1.1 200 OK\r\n"
    decoder.close()
    assert decoder.done


@given(
    st.binary(max_size=80), st.integers(min_value=0, max_value=80), st.lists(st.integers(1, 80), max_size=6)
)
@settings(max_examples=examples(200))
def test_length_body_any_split(data: bytes, length: int, cuts: list[int]) -> None:
    out, decoder = decode_body(Framing.LENGTH, split(data, cuts), length)
    if len(data) >= length:
        assert (out, decoder.done, decoder.trailing) == (data[:length], True, data[length:])
    else:
        assert (out, decoder.done, decoder.trailing) == (data, False, b"")
        assert framing_error(decoder.close).status_hint == 502


# -- BodyDecoder: chunked -------------------------------------------------------------------------------------

SMALL_CHUNKED = b'5;name=value\r\nhello\r\nA;a;b="c d"\r\n, world!!!\r\n0\r\nX-Sum: 1\r\nY:z\r\n\r\nNEXT'


def test_chunked_body_whole() -> None:
    out, decoder = decode_body(Framing.CHUNKED, [SMALL_CHUNKED])
    assert (out, decoder.done, decoder.trailing) == (b"hello, world!!!", True, b"NEXT")


def test_chunked_body_split_at_every_byte_boundary() -> None:
    for cut in range(len(SMALL_CHUNKED) + 1):
        out, decoder = decode_body(Framing.CHUNKED, [SMALL_CHUNKED[:cut], SMALL_CHUNKED[cut:]])
        assert (out, decoder.done, decoder.trailing) == (b"hello, world!!!", True, b"NEXT"), cut
    for first, second in itertools.combinations(range(1, len(SMALL_CHUNKED)), 2):
        pieces = [SMALL_CHUNKED[:first], SMALL_CHUNKED[first:second], SMALL_CHUNKED[second:]]
        out, decoder = decode_body(Framing.CHUNKED, pieces)
        assert (out, decoder.trailing) == (b"hello, world!!!", b"NEXT"), (first, second)


def test_chunked_body_one_byte_at_a_time() -> None:
    decoder = BodyDecoder(Framing.CHUNKED)
    out = b""
    for index, byte in enumerate(SMALL_CHUNKED):
        out += decoder.feed(bytes([byte]))
        assert decoder.done == (index >= SMALL_CHUNKED.index(b"NEXT") - 1)
    assert (out, decoder.trailing) == (b"hello, world!!!", b"NEXT")


def test_chunked_body_is_not_done_before_the_blank_line() -> None:
    end = SMALL_CHUNKED.index(b"NEXT")
    for cut in range(end):
        _, decoder = decode_body(Framing.CHUNKED, [SMALL_CHUNKED[:cut]])
        assert not decoder.done
        assert framing_error(decoder.close).status_hint == 502


@pytest.mark.parametrize(
    ("data", "payload"),
    [
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"0000000A\r\n0123456789\r\n00\r\n\r\n", b"0123456789"),
        (b"1f\r\n" + b"x" * 31 + b"\r\n0\r\n\r\n", b"x" * 31),
        (b"1F\r\n" + b"x" * 31 + b"\r\n0\r\n\r\n", b"x" * 31),
        (b"3 \t\r\nabc\r\n0 \r\n\r\n", b"abc"),
        (b'3;x\r\nabc\r\n0;last="yes"\r\n\r\n', b"abc"),
        (b"3 ;x=1\r\nabc\r\n0\r\n\r\n", b"abc"),  # BWS before ';' (RFC 9112 7.1.1), which h11 refuses
        (b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n"),
        (b"0\r\n\r\n", b""),
        (b"0\r\nTrailer-A: x\r\nTrailer-B:\r\n\r\n", b""),
        (
            b"000000000000000f\r\n" + b"y" * 15 + b"\r\n0\r\n\r\n",
            b"y" * 15,
        ),  # 16 hex digits: the most allowed
    ],
)
def test_valid_chunked_bodies(data: bytes, payload: bytes) -> None:
    out, decoder = decode_body(Framing.CHUNKED, [data + b"tail"])
    assert (out, decoder.done, decoder.trailing) == (payload, True, b"tail")
    assert decode_body(Framing.CHUNKED, [bytes([byte]) for byte in data])[0] == payload


def test_chunk_data_is_opaque() -> None:
    data = b"0\r\n\r\n\n\x00"
    wire = b"%x\r\n" % len(data) + data + b"\r\n" + LAST_CHUNK
    assert decode_body(Framing.CHUNKED, [wire])[0] == data


MALFORMED_CHUNKED = {
    "no_crlf_after_data": b"5\r\nhelloX\r\n0\r\n\r\n",
    "two_other_bytes_after_data": b"5\r\nhelloXY0\r\n\r\n",
    "bare_lf_after_data": b"5\r\nhello\n0\r\n\r\n",
    "bare_cr_after_data": b"5\r\nhello\r0\r\n\r\n",
    "data_longer_than_size": b"3\r\nhello\r\n0\r\n\r\n",
    "bare_lf_in_size_line": b"5\nhello\r\n0\r\n\r\n",
    "bare_lf_in_last_chunk": b"5\r\nhello\r\n0\n\r\n",
    "bare_cr_in_size_line": b"5\rx\r\nhello\r\n0\r\n\r\n",
    "bare_lf_in_extension": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "empty_size": b"\r\nhello\r\n0\r\n\r\n",
    "non_hex_size": b"g\r\nhello\r\n0\r\n\r\n",
    "plus_size": b"+5\r\nhello\r\n0\r\n\r\n",
    "minus_size": b"-5\r\nhello\r\n0\r\n\r\n",
    "0x_size": b"0x5\r\nhello\r\n0\r\n\r\n",
    "leading_space": b" 5\r\nhello\r\n0\r\n\r\n",
    "size_then_junk": b"5 x\r\nhello\r\n0\r\n\r\n",
    "underscore_size": b"1_0\r\n",
    "seventeen_hex_digits": b"00000000000000005\r\nhello\r\n0\r\n\r\n",
    "bare_lf_in_trailer": b"0\r\nA: b\nC: d\r\n\r\n",
    "bare_lf_ends_trailers": b"0\r\nA: b\r\n\nX\r\n",
    "trailer_without_colon": b"0\r\nAb\r\n\r\n",
    "trailer_obs_fold": b"0\r\nA: b\r\n c\r\n\r\n",
    "trailer_leading_space": b"0\r\n A: b\r\n\r\n",
    "trailer_leading_tab": b"0\r\n\tA: b\r\n\r\n",
}


@pytest.mark.parametrize("data", list(MALFORMED_CHUNKED.values()), ids=list(MALFORMED_CHUNKED))
def test_malformed_chunked_bodies_are_refused(data: bytes) -> None:
    assert framing_error(BodyDecoder(Framing.CHUNKED).feed, data).status_hint == 400
    assert framing_error(decode_body, Framing.CHUNKED, [bytes([byte]) for byte in data]).status_hint == 400


def test_over_long_chunk_lines_are_refused() -> None:
    long_size_line = b"1;" + b"x" * (MAX_CHUNK_LINE - 1) + b"\r\na\r\n0\r\n\r\n"  # MAX_CHUNK_LINE + 1 bytes
    assert framing_error(BodyDecoder(Framing.CHUNKED).feed, long_size_line).message == "malformed chunk line"
    long_trailer = b"0\r\nX: " + b"y" * MAX_CHUNK_LINE + b"\r\n\r\n"
    assert framing_error(BodyDecoder(Framing.CHUNKED).feed, long_trailer).message == "malformed chunk line"
    # Without a line end at all, refused once the line outgrows the limit and a CR (memory stays bounded).
    decoder = BodyDecoder(Framing.CHUNKED)
    assert decoder.feed(b"1;" + b"x" * (MAX_CHUNK_LINE - 2)) == b""
    assert framing_error(decoder.feed, b"xx").message == "chunk line too long"  # MAX_CHUNK_LINE + 2 bytes
    trickle = [b"0\r\nX: ", *[b"z"] * MAX_CHUNK_LINE]
    assert framing_error(decode_body, Framing.CHUNKED, trickle).message == "chunk line too long"


def test_chunk_line_of_exactly_the_limit_is_accepted_whole() -> None:
    line = b"1;" + b"x" * (MAX_CHUNK_LINE - 2)
    assert len(line) == MAX_CHUNK_LINE
    out, decoder = decode_body(Framing.CHUNKED, [line + b"\r\na\r\n0\r\n\r\n"])
    assert (out, decoder.done) == (b"a", True)


# Regression: a chunk-size line of exactly MAX_CHUNK_LINE bytes was refused when a receive ended between its CR
# and its LF (the incomplete line was measured with the CR).
def test_chunk_line_of_exactly_the_limit_is_accepted_however_split() -> None:
    wire = b"1;" + b"x" * (MAX_CHUNK_LINE - 2) + b"\r\na\r\n0\r\n\r\n"
    for cut in range(MAX_CHUNK_LINE - 2, MAX_CHUNK_LINE + 4):
        out, decoder = decode_body(Framing.CHUNKED, [wire[:cut], wire[cut:]])
        assert (out, decoder.done) == (b"a", True), cut


@st.composite
def chunked_samples(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, list[int]]:
    body = draw(st.binary(max_size=80))
    extra = draw(st.binary(max_size=20))
    wire = draw(chunked_bodies(body)) + extra
    cuts = draw(st.lists(st.integers(min_value=1, max_value=max(1, len(wire) - 1)), max_size=10))
    return wire, body, extra, cuts


@given(chunked_samples())
@settings(max_examples=examples(150))
def test_chunked_bodies_any_split(sample: tuple[bytes, bytes, bytes, list[int]]) -> None:
    wire, body, extra, cuts = sample
    out, decoder = decode_body(Framing.CHUNKED, split(wire, cuts))
    assert (out, decoder.done, decoder.trailing) == (body, True, extra)
    oracle = h11_response([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire])
    assert (oracle.body, oracle.trailing) == (body, extra)


@given(st.binary(max_size=200), st.lists(st.integers(min_value=1, max_value=200), max_size=6))
@settings(max_examples=examples(300))
def test_any_bytes_decode_the_same_whatever_the_split(data: bytes, cuts: list[int]) -> None:
    def outcome(pieces: list[bytes]) -> tuple[bytes, bool, bytes] | int:
        try:
            out, decoder = decode_body(Framing.CHUNKED, pieces)
        except HTTPFramingError as exc:
            return exc.status_hint
        return out, decoder.done, decoder.trailing

    whole = outcome([data])
    assert outcome(split(data, cuts)) == whole  # the payload before an error may differ; the verdict may not
    assert whole == 400 or not isinstance(whole, int)


# -- content_length, request_framing, response_framing --------------------------------------------------------


def cl(*values: bytes) -> Headers:
    return [(b"content-length", value) for value in values]


def te(*values: bytes) -> Headers:
    return [(b"transfer-encoding", value) for value in values]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"x-content-length", b"5")], None),
        ([(b"Content-Length", b"5")], None),  # names are expected lower-case (as parsed)
        (cl(b"5"), 5),
        (cl(b"0"), 0),
        (cl(b"007"), 7),
        (cl(b"5, 5"), 5),
        (cl(b"5,5"), 5),
        (cl(b" 5 ,\t5 "), 5),
        (cl(b"5", b"5"), 5),
        (cl(b"5, 5", b"5"), 5),
        (cl(b"5", b"05"), 5),  # agree as numbers (h11 compares the strings and refuses this)
        (cl(b"9" * 18), 10**18 - 1),
    ],
)
def test_content_length_accepted(headers: Headers, expected: int | None) -> None:
    assert content_length(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        cl(b"5, 6"),
        cl(b"5", b"6"),
        cl(b"5", b"5, 6"),
        cl(b"0", b"1"),
        cl(b"+5"),
        cl(b"-1"),
        cl(b"0x5"),
        cl(b" "),
        cl(b""),
        cl(b"5,"),
        cl(b",5"),
        cl(b"5 5"),
        cl(b"1_000"),
        cl(b"1e3"),
        cl(b"5.0"),
        cl("٥".encode()),
        cl(b"\xb2"),
        cl(b"9" * 19),
        cl(b"5", b"x"),
    ],
)
def test_content_length_refused(headers: Headers) -> None:
    assert framing_error(content_length, headers).status_hint == 400
    assert framing_error(request_framing, headers).status_hint == 400
    assert framing_error(response_framing, b"GET", 200, headers).status_hint == 400


@pytest.mark.parametrize(
    "values",
    [
        [b"gzip"],
        [b"identity"],
        [b"gzip, chunked"],
        [b"chunked, gzip"],
        [b"chunked, chunked"],
        [b"chunked", b"chunked"],
        [b"chunked", b"gzip"],
        [b""],
        [b"chunked;q=1"],
        [b"chunkedx"],
    ],
)
def test_transfer_encoding_other_than_chunked_is_refused_with_501(values: list[bytes]) -> None:
    assert framing_error(request_framing, te(*values)).status_hint == 501
    assert framing_error(response_framing, b"GET", 200, te(*values)).status_hint == 501


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], (Framing.NONE, 0)),
        ([(b"host", b"t")], (Framing.NONE, 0)),
        (cl(b"0"), (Framing.NONE, 0)),
        (cl(b"0, 0"), (Framing.NONE, 0)),
        (cl(b"7"), (Framing.LENGTH, 7)),
        (cl(b"7", b"7"), (Framing.LENGTH, 7)),
        (te(b"chunked"), (Framing.CHUNKED, 0)),
        (te(b"Chunked"), (Framing.CHUNKED, 0)),
        (te(b" CHUNKED\t"), (Framing.CHUNKED, 0)),
        # Both present: Transfer-Encoding wins and Content-Length is not even validated (RFC 9112 6.3 item 3;
        # the caller decides whether to close the connection afterwards).
        (te(b"chunked") + cl(b"7"), (Framing.CHUNKED, 0)),
        (cl(b"7") + te(b"chunked"), (Framing.CHUNKED, 0)),
        (cl(b"nonsense") + te(b"chunked"), (Framing.CHUNKED, 0)),
    ],
)
def test_request_framing(headers: Headers, expected: tuple[Framing, int]) -> None:
    assert request_framing(headers) == expected


@pytest.mark.parametrize(
    ("method", "status", "headers", "expected"),
    [
        (b"GET", 200, [], (Framing.CLOSE, 0)),
        (b"POST", 500, [(b"content-type", b"text/plain")], (Framing.CLOSE, 0)),
        (b"GET", 200, cl(b"0"), (Framing.NONE, 0)),
        (b"GET", 200, cl(b"12"), (Framing.LENGTH, 12)),
        (b"GET", 200, te(b"chunked"), (Framing.CHUNKED, 0)),
        (b"GET", 200, te(b"chunked") + cl(b"12"), (Framing.CHUNKED, 0)),
        (b"GET", 200, cl(b"bad") + te(b"chunked"), (Framing.CHUNKED, 0)),
        (b"HEAD", 200, cl(b"12"), (Framing.NONE, 0)),
        (b"HEAD", 200, te(b"chunked"), (Framing.NONE, 0)),
        (b"HEAD", 200, [], (Framing.NONE, 0)),
        # What the request and status imply comes first: framing headers are not even looked at.
        (b"HEAD", 200, te(b"gzip"), (Framing.NONE, 0)),
        (b"GET", 204, cl(b"12"), (Framing.NONE, 0)),
        (b"GET", 204, [], (Framing.NONE, 0)),
        (b"GET", 304, cl(b"12"), (Framing.NONE, 0)),
        (b"GET", 304, te(b"chunked"), (Framing.NONE, 0)),
        (b"GET", 100, [], (Framing.NONE, 0)),
        (b"GET", 101, [], (Framing.NONE, 0)),
        (b"GET", 103, cl(b"12"), (Framing.NONE, 0)),
        (b"GET", 199, cl(b"x"), (Framing.NONE, 0)),
        (b"GET", 205, cl(b"3"), (Framing.LENGTH, 3)),
    ],
)
def test_response_framing(
    method: bytes, status: int, headers: Headers, expected: tuple[Framing, int]
) -> None:
    assert response_framing(method, status, headers) == expected


@given(
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
    st.sampled_from([200, 201, 204, 206, 304, 404, 500]),
    st.sampled_from(["none", "cl", "cl0", "te", "both"]),
)
def test_response_framing_agrees_with_h11(method: bytes, status: int, kind: str) -> None:
    headers = {
        "none": [],
        "cl": cl(b"3"),
        "cl0": cl(b"0"),
        "te": te(b"chunked"),
        "both": te(b"chunked") + cl(b"3"),
    }[kind]
    body = b"3\r\nabc\r\n0\r\n\r\n" if kind in ("te", "both") else b"abc"
    wire = (
        b"HTTP/1.1 %d X\r\n" % status + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body
    )
    oracle = h11_response([wire], method)
    framing, length = response_framing(method, status, headers)
    decoder = BodyDecoder(framing, length)
    out = decoder.feed(body)
    if not decoder.done:
        decoder.close()
    assert (out, decoder.trailing) == (oracle.body, oracle.trailing)


# -- has_connection_token -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"connection", b"close")], True),
        ([(b"connection", b"Close")], True),
        ([(b"connection", b"CLOSE")], True),
        ([(b"connection", b"keep-alive, close")], True),
        ([(b"connection", b"close,keep-alive")], True),
        ([(b"connection", b"upgrade ,\tclose\t, x")], True),
        ([(b"connection", b"keep-alive"), (b"connection", b"close")], True),
        ([(b"connection", b"keep-alive")], False),
        ([(b"connection", b"closed")], False),
        ([(b"connection", b"close-ish, notclose")], False),
        ([(b"connection", b"")], False),
        ([(b"proxy-connection", b"close")], False),
        ([(b"x-connection", b"close")], False),
        ([], False),
    ],
)
def test_has_connection_token(headers: Headers, expected: bool) -> None:
    assert has_connection_token(headers, b"close") is expected


def test_has_connection_token_takes_a_lower_case_token() -> None:
    headers = [(b"connection", b"Keep-Alive")]
    assert has_connection_token(headers, b"keep-alive")
    assert not has_connection_token(headers, b"Keep-Alive")  # the token argument is not folded


# -- serializers ----------------------------------------------------------------------------------------------


def h11_request(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def test_serialize_request_head_exact_bytes() -> None:
    head = serialize_request_head(
        b"POST", b"/v1/chat/completions?x=1", [(b"Host", b"api.test"), (b"content-length", b"2")]
    )
    assert head == b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.test\r\ncontent-length: 2\r\n\r\n"


def test_serialize_response_head_exact_bytes() -> None:
    head = serialize_response_head(
        429, b"Too Many Requests", [(b"retry-after", b"3"), (b"content-length", b"0")]
    )
    assert head == b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 0\r\n\r\n"
    assert serialize_response_head(200, b"OK", []) == b"HTTP/1.1 200 OK\r\n\r\n"


_target = st.lists(st.sampled_from([bytes([b]) for b in range(0x21, 0x7F)]), max_size=30).map(
    lambda chars: b"/" + b"".join(chars)
)
_header_list = st.lists(st.tuples(_name, _value), max_size=6)


@given(_token, _target, _header_list)
@settings(max_examples=examples(100))
def test_serialized_requests_read_back_through_h11(method: bytes, target: bytes, headers: Headers) -> None:
    all_headers = [(b"Host", b"api.test"), *headers]
    event = h11_request(serialize_request_head(method, target, all_headers))
    assert (bytes(event.method), bytes(event.target), bytes(event.http_version)) == (method, target, b"1.1")
    assert [(bytes(n), bytes(v)) for n, v in event.headers] == [(n.lower(), v) for n, v in all_headers]


@given(st.integers(min_value=100, max_value=599).filter(lambda status: status != 101), _reason, _header_list)
@settings(max_examples=examples(100))
def test_serialized_responses_read_back_through_h11(status: int, reason: bytes, headers: Headers) -> None:
    head = serialize_response_head(status, reason, headers)
    parsed = parse_response_head(head, MAX_HEAD)
    expected = [(n.lower(), v) for n, v in headers]
    assert parsed == (ResponseHead(status, reason, b"1.1", expected), len(head))
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="HEAD", target="/", headers=[("Host", "t")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    assert (event.status_code, bytes(event.reason)) == (status, reason)
    assert [(bytes(n), bytes(v)) for n, v in event.headers] == expected


SECRET = b"sk-abc\r\nx-evil: 1"

UNFRAMEABLE_HEADERS = {
    "crlf_injection": (b"authorization", b"Bearer " + SECRET),
    "lf_injection": (b"x-api-key", b"abc\nx-evil: 1"),
    "cr": (b"x-api-key", b"abc\rdef"),
    "nul": (b"x-api-key", b"abc\x00def"),
    "trailing_crlf": (b"x-api-key", b"abc\r\n"),
    "del": (b"x-a", b"\x7f"),
    "esc": (b"x-a", b"\x1b"),
    "vt": (b"x-a", b"a\x0bb"),
    "empty_name": (b"", b"v"),
    "space_in_name": (b"x evil", b"v"),
    "colon_in_name": (b"x-evil:", b"v"),
    "crlf_in_name": (b"x\r\nx-evil", b"1"),
    "non_ascii_name": ("é".encode(), b"v"),
}


@pytest.mark.parametrize("header", list(UNFRAMEABLE_HEADERS.values()), ids=list(UNFRAMEABLE_HEADERS))
def test_header_injection_is_refused(header: tuple[bytes, bytes]) -> None:
    headers = [(b"host", b"api.test"), header]
    error = framing_error(check_header_values, headers)
    assert error.status_hint == 500
    assert framing_error(serialize_request_head, b"GET", b"/", headers).status_hint == 500
    assert b"sk-abc".decode() not in str(error)


@pytest.mark.parametrize(
    "value", [b"", b"plain", b"tab\tinside", b"obs \x80\xff text", b" padded ", b"quote\"'", b"\t"]
)
def test_harmless_values_are_allowed(value: bytes) -> None:
    check_header_values([(b"x-a", value)])
    event = h11_request(serialize_request_head(b"GET", b"/", [(b"host", b"t"), (b"x-a", value)]))
    assert list(event.headers)[1] == (b"x-a", value.strip(b" \t"))


@given(st.binary(max_size=20))
@settings(max_examples=examples(300))
def test_checked_values_never_break_out_of_their_line(value: bytes) -> None:
    headers = [(b"host", b"t"), (b"x-a", value), (b"x-b", b"after")]
    try:
        head = serialize_request_head(b"GET", b"/", headers)
    except HTTPFramingError:
        assert any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value)
        return
    event = h11_request(head)
    assert [(bytes(n), bytes(v)) for n, v in event.headers] == [
        (b"host", b"t"),
        (b"x-a", value.strip(b" \t")),
        (b"x-b", b"after"),
    ]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b""),
        (b"GET", b"/a b"),
        (b"GET", b"/a\tb"),
        (b"GET", b"/ HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /"),
        (b"GET", b"/a\nb"),
        (b"GET", b"/\x00"),
        (b"GET", b"/\x7f"),
        (b"GET", b"/\xff"),
        (b"", b"/"),
        (b"G T", b"/"),
        (b"GET\r\n", b"/"),
        (b"GET /", b"/"),
        (b"G(T", b"/"),
    ],
)
def test_unframeable_request_lines_are_refused(method: bytes, target: bytes) -> None:
    assert framing_error(serialize_request_head, method, target, [(b"host", b"t")]).status_hint == 500


def test_chunk_framing_bytes() -> None:
    assert chunk(b"abc") == b"3\r\nabc\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert chunk(b"\r\n") == b"2\r\n\r\n\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert chunk(b"") == LAST_CHUNK  # why callers must never frame an empty piece
    decoder = BodyDecoder(Framing.CHUNKED)
    assert decoder.feed(chunk(b"hi")) == b"hi"
    assert not decoder.done
    assert decoder.feed(LAST_CHUNK) == b""
    assert decoder.done


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=6), st.binary(max_size=10))
@settings(max_examples=examples(200))
def test_chunks_round_trip_through_body_decoder_and_h11(pieces: list[bytes], extra: bytes) -> None:
    wire = b"".join(chunk(piece) for piece in pieces) + LAST_CHUNK
    body = b"".join(pieces)
    out, decoder = decode_body(Framing.CHUNKED, [wire + extra])
    assert (out, decoder.done, decoder.trailing) == (body, True, extra)
    head = serialize_response_head(200, b"OK", [(b"transfer-encoding", b"chunked")])
    oracle = h11_response([head + wire + extra])
    assert (oracle.body, oracle.trailing) == (body, extra)
