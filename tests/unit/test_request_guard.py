"""HeadScanner: bytes in, a head or a rejection out (no sockets)."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.request_guard import HeadScanner, RequestHead, RequestRejected
from trioproxy.settings import ServerLimits

LIMITS = ServerLimits()


def scan(
    data: bytes, *, limits: ServerLimits = LIMITS, chunks: list[int] | None = None
) -> RequestHead | None:
    """Feed ``data`` (whole, or cut at the given offsets) and return the head, None if incomplete."""
    scanner = HeadScanner(limits)
    cuts = [0, *sorted(chunks or []), len(data)]
    head = None
    for start, end in itertools.pairwise(cuts):
        scanner.feed(data[start:end])
        head = scanner.next_head()
        if head is not None:
            break
    return head


def outcome(
    data: bytes, *, limits: ServerLimits = LIMITS, chunks: list[int] | None = None
) -> RequestHead | int | None:
    """The head, the rejection's status, or None when more bytes are needed."""
    try:
        return scan(data, limits=limits, chunks=chunks)
    except RequestRejected as exc:
        return exc.status_hint


def status_of(data: bytes, *, limits: ServerLimits = LIMITS) -> int:
    with pytest.raises(RequestRejected) as info:
        scan(data, limits=limits)
    return info.value.status_hint


def head_bytes(size: int, *, target: str = "/") -> bytes:
    """A GET head of exactly ``size`` bytes (padded with one header)."""
    start = f"GET {target} HTTP/1.1\r\nHost: t\r\nX-Pad: ".encode()
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


# -- valid heads ---------------------------------------------------------------------------------------------


def test_valid_head_is_parsed_and_the_rest_kept() -> None:
    data = (
        b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type:  application/json \r\nContent-Length: 2\r\n\r\n{}"
    )
    scanner = HeadScanner(LIMITS)
    scanner.feed(data)
    head = scanner.next_head()
    assert head == RequestHead(
        method="POST",
        target="/v1/chat?x=1",
        headers=((b"host", b"t"), (b"content-type", b"application/json"), (b"content-length", b"2")),
        http_version="1.1",
    )
    assert scanner.buffered == data
    assert scanner.next_head() is head  # idempotent once complete


def test_incomplete_head_needs_more() -> None:
    assert not HeadScanner(LIMITS).has_data
    scanner = HeadScanner(LIMITS)
    scanner.feed(b"GET / HTTP/1.1\r\nHost: t\r\n")
    assert scanner.has_data
    assert scanner.next_head() is None
    assert scanner.partial_head() == RequestHead("GET", "/", ((b"host", b"t"),), "1.1")
    scanner.feed(b"\r\n")
    assert scanner.next_head() is not None


def test_empty_lines_before_the_request_line_are_skipped() -> None:
    scanner = HeadScanner(LIMITS)
    scanner.feed(b"\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert scanner.next_head() == RequestHead("GET", "/", ((b"host", b"t"),), "1.1")
    assert scanner.buffered == b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def test_http_10_without_host_passes_the_guard() -> None:
    assert scan(b"GET / HTTP/1.0\r\n\r\n") == RequestHead("GET", "/", (), "1.0")


# -- limits at their boundaries ------------------------------------------------------------------------------


def test_header_block_boundary() -> None:
    exact = head_bytes(LIMITS.max_header_bytes)
    assert len(exact) == 16384
    assert scan(exact) is not None
    assert status_of(head_bytes(LIMITS.max_header_bytes + 1)) == 431


def test_header_block_rejected_before_the_terminator_arrives() -> None:
    scanner = HeadScanner(LIMITS)
    scanner.feed(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * LIMITS.max_header_bytes)
    with pytest.raises(RequestRejected) as info:
        scanner.next_head()
    assert info.value.status_hint == 431
    assert info.value.head is not None
    assert info.value.head.target == "/"


def test_leading_empty_lines_count_toward_the_header_block() -> None:
    data = b"\r\n" * 10 + head_bytes(LIMITS.max_header_bytes - 20)
    assert scan(data) is not None
    assert status_of(b"\r\n" + data) == 431


def test_header_count_boundary() -> None:
    def with_headers(count: int) -> bytes:
        lines = [b"Host: t"] + [b"X-H%d: v" % i for i in range(count - 1)]
        return b"GET / HTTP/1.1\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"

    head = scan(with_headers(100))
    assert head is not None
    assert len(head.headers) == 100
    assert status_of(with_headers(101)) == 431


def test_target_length_boundary() -> None:
    assert scan(head_bytes(9000, target="/" + "a" * 8191)) is not None
    assert status_of(head_bytes(9000, target="/" + "a" * 8192)) == 414


def test_long_target_rejected_before_the_line_ends() -> None:
    scanner = HeadScanner(LIMITS)
    scanner.feed(b"GET /" + b"a" * 8191)
    assert scanner.next_head() is None
    scanner.feed(b"a")
    with pytest.raises(RequestRejected) as info:
        scanner.next_head()
    assert info.value.status_hint == 414


def test_target_check_is_not_fooled_by_the_version_arriving_late() -> None:
    data = b"GET /" + b"a" * 8191 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    assert scan(data, chunks=list(range(1, len(data)))) is not None


def test_content_length_boundary() -> None:
    limits = ServerLimits(max_body_bytes=1000)
    assert scan(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n", limits=limits) is not None
    data = b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n"
    assert status_of(data, limits=limits) == 413
    assert status_of(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 1001\r\n\r\n", limits=limits) == 413


# -- malformed and ambiguous heads ---------------------------------------------------------------------------

MALFORMED = {
    "cl_and_te": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "te_chunked_gzip": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te_xchunked": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    "te_twice": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "te_obs_fold": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n", 400),
    "te_space_before_colon": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    "te_underscore": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer_Encoding: chunked\r\n\r\n", 400),
    "te_on_http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n\tb\r\n\r\n", 400),
    "underscore": (b"GET / HTTP/1.1\r\nHost: t\r\nX_Api_Key: k\r\n\r\n", 400),
    "no_colon": (b"GET / HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n", 400),
    "empty_name": (b"GET / HTTP/1.1\r\nHost: t\r\n: v\r\n\r\n", 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: t\n\n", 400),
    "bare_lf_in_headers": (b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", 400),
    "bare_cr": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n", 400),
    "absolute_form": (b"GET http://169.254.169.254/x HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "asterisk": (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "authority_form": (b"GET a:443 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "connect": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    "upgrade": (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400),
    "http2": (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    "http12": (b"GET / HTTP/1.2\r\nHost: t\r\n\r\n", 505),
    "http_lowercase": (b"GET / http/1.1\r\nHost: t\r\n\r\n", 400),
    "http09": (b"GET /\r\n\r\n", 400),
    "double_space": (b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "leading_space": (b" GET / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "bad_method": (b"G@T / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "non_ascii_target": (b"GET /\xff HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "tls_hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "nul": (b"\x00GET / HTTP/1.1\r\n\r\n", 400),
}


@pytest.mark.parametrize(("data", "status"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_heads_are_rejected(data: bytes, status: int) -> None:
    assert status_of(data) == status


@pytest.mark.parametrize("data", [b"\x16", b"\x00", b" ", b"GE\x01"])
def test_garbage_rejected_at_the_first_bad_byte(data: bytes) -> None:
    scanner = HeadScanner(LIMITS)
    scanner.feed(data)
    with pytest.raises(RequestRejected) as info:
        scanner.next_head()
    assert info.value.status_hint == 400
    assert info.value.head is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b:c\r\n\r\n", "obsolete line folding in the request head"),
        (b"GET / HTTP/1.1\nHost: t\r\n\r\n", "bare LF line ending in the request head"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX_A: b\r\n\r\n", "underscore in a header name"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\n\r\n", "protocol upgrades are not supported"),
    ],
)
def test_rejection_names_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(RequestRejected) as info:
        scan(data)
    assert info.value.message == message


def test_rejection_messages_never_echo_values() -> None:
    secret = b"sk-secret-value"
    for data in (
        b"GET /?key=" + secret + b" HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nX_Key: " + secret + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nAuthorization: " + secret + b"\r\n folded\r\n\r\n",
    ):
        with pytest.raises(RequestRejected) as info:
            scan(data)
        assert secret.decode() not in str(info.value)


def test_head_of_a_late_rejection_is_complete() -> None:
    with pytest.raises(RequestRejected) as info:
        scan(b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\n\r\n")
    assert info.value.head == RequestHead(
        "POST", "/v1/messages", ((b"host", b"t"), (b"upgrade", b"h2c")), "1.1"
    )


# -- properties ----------------------------------------------------------------------------------------------

_token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12
)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
_path = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/:?=&%", max_size=40).map(lambda p: "/" + p)


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid HTTP/1.1 request: (whole bytes, the body)."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    names = draw(st.lists(_token.map(lambda n: "X-" + n), max_size=8))
    headers = [("Host", "example.test")] + [(name, draw(_value)) for name in names]
    body = draw(st.binary(max_size=40))
    if body or draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    lines = [f"{method} {draw(_path)} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, body


@given(valid_requests(), st.lists(st.integers(min_value=1, max_value=400), max_size=10))
def test_valid_request_split_anywhere_parses_the_same(sample: tuple[bytes, bytes], cuts: list[int]) -> None:
    data, _ = sample
    whole = scan(data)
    assert whole is not None
    assert scan(data, chunks=[cut for cut in cuts if cut < len(data)]) == whole


@given(valid_requests())
def test_guard_and_h11_agree_on_valid_requests(sample: tuple[bytes, bytes]) -> None:
    data, body = sample
    scanner = HeadScanner(LIMITS)
    for i in range(len(data)):  # one byte at a time
        scanner.feed(data[i : i + 1])
        if scanner.next_head() is not None:
            break
    head = scanner.next_head()
    assert head is not None
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(scanner.buffered + data[i + 1 :])
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert event.method.decode() == head.method
    assert event.target.decode() == head.target
    assert list(event.headers) == list(head.headers)
    received = b""
    while isinstance(event := conn.next_event(), h11.Data):
        received += event.data
    assert isinstance(event, h11.EndOfMessage)
    assert received == body


@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=300), max_size=6))
@settings(max_examples=examples(300))
def test_any_bytes_end_in_a_head_a_rejection_or_a_wait(data: bytes, cuts: list[int]) -> None:
    limits = ServerLimits(max_header_bytes=256, max_target_bytes=64, max_header_count=5)
    whole = outcome(data, limits=limits)
    assert outcome(data, limits=limits, chunks=[cut for cut in cuts if cut < len(data)]) == whole
    if isinstance(whole, int):
        assert 400 <= whole < 600
    elif whole is None:
        assert len(data) <= limits.max_header_bytes


@given(st.binary(min_size=1, max_size=40))
def test_guard_and_h11_agree_on_header_values(junk: bytes) -> None:
    data = b"GET / HTTP/1.1\r\nHost: t\r\nX-J: " + junk + b"\r\n\r\n"
    try:
        head = scan(data)
    except RequestRejected:
        return
    if head is None:
        return
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return  # h11 refuses what the guard let through: the server answers h11's 4xx, still a rejection
    assert isinstance(event, h11.Request)
    assert list(event.headers) == list(head.headers)


# -- the whole-head fast path agrees with the line-by-line scan ---------------------------------------------

_LINE_PIECES = st.sampled_from(
    [
        b"Host: example.com",
        b"host:x",
        b"Content-Type: application/json",
        b"Content-Length: 5",
        b"Content-Length: 5, 5",
        b"content-length: 99999999999",
        b"Transfer-Encoding: chunked",
        b"X-Under_score: 1",
        b"X-Tab: a\tb",
        b"X-Ctl: a\x01b",
        b"X-Del: a\x7fb",
        b" folded",
        b"\tfolded",
        b"No-Colon",
        b"Sp ace: 1",
        b"X-Empty:",
        b"X-Ows:   padded   ",
        b"Upgrade: h2c",
        b"X-Cr: a\rb",
        b"X-High: caf\xc3\xa9",
        b"",
    ]
)
_REQUEST_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"POST /v1/chat/completions?x=1 HTTP/1.1",
        b"GET / HTTP/1.0",
        b"GET / HTTP/2.0",
        b"CONNECT / HTTP/1.1",
        b"GET http://x/ HTTP/1.1",
        b"GET  / HTTP/1.1",
        b"G@T / HTTP/1.1",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1",
        b"",
    ]
)


def _verdict(data: bytes, chunks: list[int] | None) -> object:
    try:
        head = scan(data, chunks=chunks)
    except RequestRejected as exc:
        return (exc.status_hint, exc.message)
    return head


@settings(max_examples=examples(300))
@given(
    _REQUEST_LINES,
    st.lists(_LINE_PIECES, max_size=8),
    st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"]),
    st.binary(max_size=8),
)
def test_whole_head_fast_path_agrees_with_the_line_by_line_scan(
    request_line: bytes, lines: list[bytes], eol: bytes, rest: bytes
) -> None:
    """Fed in one piece, a head may take the fast path; fed a byte at a time it never does. Both must give
    the same head, or the same refusal (status and reason), or both wait."""
    data = b"\r\n".join([request_line, *lines]) + b"\r\n" + eol + rest
    assert _verdict(data, None) == _verdict(data, list(range(1, len(data))))
