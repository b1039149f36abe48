"""Sans-IO HTTP/1.1 framing for the hot path: response heads, message bodies, and the bytes we write.

The data plane first spoke HTTP through h11 on both sides. h11 is correct, but it validates every header of
every message with regular expressions, builds an event object per piece and runs a state machine per event:
about 100 µs of CPU per proxied request, more than everything else a request does together. The client side
already had a strict scanner of its own (:mod:`trioproxy.request_guard`), so h11 parsed every head twice.
This module keeps h11's rules where they guard correctness (framing precedence, Content-Length agreement,
chunk syntax, field-value characters) and drops the work that re-checks bytes we built or checked ourselves.

What is here, all pure functions and small state machines over bytes:

* :func:`parse_response_head`: a provider's status line and headers (strict, like h11, except that obs-fold is
  refused rather than unfolded);
* :func:`response_framing`/:func:`request_framing`: how a message's body is delimited (RFC 9112 section 6.3);
* :class:`BodyDecoder`: removes that framing incrementally (Content-Length, chunked with extensions and
  trailers, or close-delimited), keeping whatever follows the message;
* :func:`serialize_request_head`, :func:`serialize_response_head`, :func:`chunk`: the bytes we write, with a
  final check that no header value can break out of its line (a provider secret with a CR LF in it must not
  inject a header).

Error handling: malformed input raises :class:`HTTPFramingError` with a fixed message (never quoting the
bytes, which may carry a key) and a status hint; callers map it to their own error (400 to a client, 502 for a
provider).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from trioproxy.errors import TrioProxyError

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 5.6.2 token, and the characters a field value may not contain (CTLs but HTAB; h11 allows
# obs-text, so do we).
_TOKEN_RE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKENS_RE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+(?: [-!#$%&'*+.^_`|~0-9A-Za-z]+)*")
_STATUS_LINE_RE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t !-~\x80-\xff]*))?")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_OWS = b" \t"
# A chunk-size line or a trailer line longer than this is refused (h11 bounds them by its event size).
MAX_CHUNK_LINE = 4096
_HEAD_END_RE = re.compile(rb"\r?\n\r?\n")

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HTTPFramingError(TrioProxyError):
    """Bytes that are not a well-formed HTTP/1.1 message (or a message we refuse to frame)."""

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message, status_hint=status_hint)


class Framing(Enum):
    NONE = "none"  # no body at all (HEAD, 1xx, 204, 304, or a request without a body)
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    CLOSE = "close"  # until the connection closes (responses only)


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head: lower-case header names, values without surrounding OWS."""

    status: int
    reason: bytes
    http_version: bytes  # b"1.1" or b"1.0"
    headers: Headers


def parse_response_head(buffer: bytes | bytearray, max_bytes: int) -> tuple[ResponseHead, int] | None:
    """Parse the head at the start of ``buffer``; ``None`` if it is not complete yet.

    Returns the head and the number of bytes it took (the body starts there). Bare LF line endings are
    accepted from a provider (as h11 does); obs-fold lines, non-token names and control characters in values
    are refused. A head larger than ``max_bytes`` raises with status hint 431.
    """
    # The limit counts the lines; the blank line that ends them (up to 4 bytes) is not held against it, so a
    # head is judged the same however its bytes arrive.
    match = _HEAD_END_RE.search(buffer, 0, max_bytes + 4)
    if match is None:
        if len(buffer) > max_bytes + 3:
            raise HTTPFramingError("the response head is too large", status_hint=431)
        return None
    lines = bytes(buffer[: match.start()]).split(b"\n")
    # Every line but the last still carries its CR; the last one's line end is part of the match, so a CR
    # left on it is a stray one (as is any other CR).
    lines = [line.removesuffix(b"\r") for line in lines[:-1]] + lines[-1:]
    if any(b"\r" in line for line in lines):
        raise HTTPFramingError("bare CR in the response head")
    status = _STATUS_LINE_RE.fullmatch(lines[0])
    if status is None or status[2][0] == 0x30:  # a status below 100 is not HTTP
        raise HTTPFramingError("malformed status line")
    headers = _parse_header_lines(lines[1:])
    return ResponseHead(int(status[2]), status[3] or b"", status[1], headers), match.end()


def _parse_header_lines(lines: Sequence[bytes]) -> Headers:
    headers: Headers = []
    for line in lines:
        if not line:
            raise HTTPFramingError("empty header line")
        if line[0] in _OWS:
            raise HTTPFramingError("obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN_RE.fullmatch(name) is None:
            raise HTTPFramingError("malformed header line")
        value = value.strip(_OWS)
        if _BAD_VALUE_RE.search(value) is not None:
            raise HTTPFramingError("control character in a header value")
        headers.append((name.lower(), value))
    return headers


def content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of lower-case ``headers``; several values (or a list) must agree, as h11 demands."""
    found: bytes | None = None
    for name, value in headers:
        if name != b"content-length":
            continue
        for item in value.split(b","):
            item = item.strip(_OWS)
            if not item.isdigit() or not item.isascii() or len(item) > 18:
                raise HTTPFramingError("malformed Content-Length")
            if found is not None and int(item) != int(found):
                raise HTTPFramingError("conflicting Content-Length values")
            found = item
    return None if found is None else int(found)


def _transfer_encoding(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    values = [value for name, value in headers if name == b"transfer-encoding"]
    if not values:
        return None
    codings = [item.strip(_OWS).lower() for value in values for item in value.split(b",")]
    if codings != [b"chunked"]:
        raise HTTPFramingError("Transfer-Encoding other than chunked", status_hint=501)
    return b"chunked"


def request_framing(headers: Sequence[tuple[bytes, bytes]]) -> tuple[Framing, int]:
    """A request's body framing: chunked, Content-Length (``NONE`` for length 0) or none."""
    if _transfer_encoding(headers) is not None:
        return Framing.CHUNKED, 0
    length = content_length(headers)
    if not length:
        return Framing.NONE, 0
    return Framing.LENGTH, length


def response_framing(
    request_method: bytes, status: int, headers: Sequence[tuple[bytes, bytes]]
) -> tuple[Framing, int]:
    """A response's body framing (RFC 9112 section 6.3): what the request and the status imply first."""
    if request_method == b"HEAD" or status in (204, 304) or status < 200:
        return Framing.NONE, 0
    if _transfer_encoding(headers) is not None:
        return Framing.CHUNKED, 0
    length = content_length(headers)
    if length is None:
        return Framing.CLOSE, 0
    if length == 0:
        return Framing.NONE, 0
    return Framing.LENGTH, length


def has_connection_token(headers: Sequence[tuple[bytes, bytes]], token: bytes) -> bool:
    """Whether a ``Connection`` header lists ``token`` (lower-case)."""
    for name, value in headers:
        if name == b"connection" and any(item.strip(_OWS).lower() == token for item in value.split(b",")):
            return True
    return False


# -- bodies ---------------------------------------------------------------------------------------------------

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class BodyDecoder:
    """Removes a body's framing, incrementally: feed it raw bytes, get the payload bytes they held.

    ``done`` turns True at the end of the body (for ``CLOSE`` framing: after :meth:`close`); bytes after the
    end are kept in ``trailing`` (a pipelined request, or garbage after a response). Chunk extensions and
    trailer fields are read and dropped. Every line of the chunked syntax must end in CR LF.
    """

    __slots__ = ("_buffer", "_framing", "_remaining", "_state", "done", "trailing")

    def __init__(self, framing: Framing, length: int = 0) -> None:
        self._framing = framing
        self._remaining = length
        self._buffer = b""  # an incomplete chunk-size or trailer line, or a partial CR LF
        self._state = _SIZE
        self.done = framing is Framing.NONE
        self.trailing = b""

    def feed(self, data: bytes) -> bytes:
        """The payload bytes in ``data`` (possibly ``b""``); sets ``done`` when the body ended."""
        if self.done:
            self.trailing += data
            return b""
        framing = self._framing
        if framing is Framing.LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                return data
            self._remaining = 0
            self.done = True
            self.trailing = data[remaining:]
            return data[:remaining]
        if framing is Framing.CLOSE:
            return data
        return self._feed_chunked(data)

    def close(self) -> None:
        """The connection reached EOF: a close-delimited body ends; any other unfinished body was cut short."""
        if self.done:
            return
        if self._framing is Framing.CLOSE:
            self.done = True
            return
        raise HTTPFramingError("the body ended early (the connection closed)", status_hint=502)

    def _feed_chunked(self, data: bytes) -> bytes:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        out: list[bytes] = []
        position = 0
        size = len(data)
        while position < size:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, size - position)
                out.append(data[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            if state == _DATA_END:
                if size - position < 2:
                    self._buffer = data[position:]
                    break
                if data[position : position + 2] != b"\r\n":
                    raise HTTPFramingError("chunk data not followed by CR LF")
                position += 2
                self._state = _SIZE
                continue
            newline = data.find(b"\r\n", position)
            if newline == -1:
                if size - position > MAX_CHUNK_LINE + 1:  # the line and the CR of its line end
                    raise HTTPFramingError("chunk line too long")
                self._buffer = data[position:]
                break
            line = data[position:newline]
            position = newline + 2
            if len(line) > MAX_CHUNK_LINE or b"\n" in line or b"\r" in line:
                raise HTTPFramingError("malformed chunk line")
            if state == _SIZE:
                match = _CHUNK_SIZE_RE.fullmatch(line)
                if match is None:
                    raise HTTPFramingError("malformed chunk size")
                self._remaining = int(match[1], 16)
                self._state = _DATA if self._remaining else _TRAILER
            elif line:  # a trailer field: read and dropped
                if line[0] in _OWS or b":" not in line:
                    raise HTTPFramingError("malformed trailer")
            else:
                self.done = True
                self.trailing = data[position:]
                break
        return b"".join(out) if len(out) != 1 else out[0]


# -- what we write --------------------------------------------------------------------------------------------


def check_header_values(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse any header that could break out of its line (names must be tokens, values free of CTLs).

    Two regex scans in all, over the names joined by spaces (never a token character, so their count must be
    exactly the joins) and the values joined by tabs (allowed in a value): a header block is checked on every
    request.
    """
    if not headers:
        return
    names = b" ".join([name for name, _ in headers])
    values = b"\t".join([value for _, value in headers])
    if (
        names.count(b" ") != len(headers) - 1  # a space inside a name
        or _TOKENS_RE.fullmatch(names) is None
        or _BAD_VALUE_RE.search(values) is not None
    ):
        raise HTTPFramingError("a header cannot be framed as HTTP/1.1", status_hint=500)


def serialize_request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``METHOD target HTTP/1.1`` and the headers exactly as given (the caller frames the body)."""
    check_header_values(headers)
    if _TOKEN_RE.fullmatch(method) is None or not target or _BAD_TARGET_RE.search(target) is not None:
        raise HTTPFramingError("the request line cannot be framed", status_hint=500)
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


_BAD_TARGET_RE = re.compile(rb"[^\x21-\x7e]")


def serialize_response_head(status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``HTTP/1.1 status reason`` and the headers as given (already validated or our own constants)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
