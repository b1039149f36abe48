"""The sans-IO parser of a client's request head: strict, because the gateway must refuse what others might
read differently.

General HTTP parsers (h11 among them) are lenient: they unfold obs-fold lines, accept bare ``\\n`` line
endings, let ``Transfer-Encoding`` win over ``Content-Length``, accept absolute-form targets and let a peer
propose ``Upgrade``/``CONNECT``; few limit the header count or the target length. A gateway behind a load
balancer must *reject* every ambiguous message rather than normalise it (an intermediary that parses the same
bytes differently is how request smuggling works). :class:`HeadScanner` is the only parser of a client's
head: what it returns is what the handler sees; the body's framing is then taken from it by
:func:`trioproxy.http1.request_framing`.

What is refused, and with which status (the numbers live in :class:`~trioproxy.settings.ServerLimits`):

* a head larger than ``max_header_bytes`` (request line, headers and the blank line) -> 431;
* more than ``max_header_count`` header lines -> 431;
* a request target longer than ``max_target_bytes`` -> 414 (as soon as the target is known to be too long);
* ``Content-Length`` above ``max_body_bytes`` -> 413 (before a body byte is read or ``100 Continue`` sent);
* HTTP versions other than 1.0 and 1.1 -> 505; ``CONNECT`` -> 405;
* anything but an origin-form target (``/...``): absolute-form, authority-form and ``*`` -> 400;
* a missing ``Host`` header on HTTP/1.1, or more than one (as h11 demands); a control character in a value;
* bare LF or bare CR line endings, obs-fold continuation lines, ``_`` in a header name, a header name that is
  not a token (this includes whitespace before the colon), ``Content-Length`` together with
  ``Transfer-Encoding``, a ``Transfer-Encoding`` other than exactly one ``chunked``, ``Transfer-Encoding`` on
  HTTP/1.0, an ``Upgrade`` header, method bytes that cannot start an HTTP request (TLS hello, NUL) -> 400.

Error messages are fixed strings: they never echo the target or a header value, which may carry a key.
The scan is linear in the bytes received however they are split, and never looks past ``max_header_bytes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from trioproxy.errors import ClientProtocolError
from trioproxy.settings import ServerLimits

# RFC 9110 §5.6.2 tchar; the same set as h11's ``token``.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN_RE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb"HTTP/([0-9])\.([0-9])")
_SUPPORTED_VERSIONS = frozenset({"1.0", "1.1"})
_OWS = b" \t"
# What the fast path of HeadScanner accepts without looking further: a token method, an origin-form target of
# visible ASCII, HTTP/1.0 or 1.1; header lines of a token name without "_", optional whitespace, and a value
# without control characters. Everything else goes through the line-by-line checks.
_PLAIN_REQUEST_LINE_RE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) (/[\x21-\x7e]*) HTTP/(1\.[01])")
_PLAIN_FIELD_RE = re.compile(rb"([-!#$%&'*+.^`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
# Characters a field value may not hold (RFC 9110 section 5.5: CTLs but HTAB; CR and LF are caught earlier).
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the scanner parsed of a request head: header names lower-case, values without surrounding OWS.

    A head attached to a rejection may be partial: it holds the request line and the header lines that had
    arrived when the request was refused.
    """

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    http_version: str


class RequestRejected(ClientProtocolError):
    """The server refuses a request: ``status_hint`` is the answer's status, ``head`` what was parsed."""

    def __init__(self, message: str, *, status_hint: int, head: RequestHead | None = None) -> None:
        super().__init__(message, status_hint=status_hint)
        self.head = head


class HeadScanner:
    """Collect the bytes of one request head and refuse it as early as the bytes allow.

    Feed it whatever the socket returned with :meth:`feed`, then call :meth:`next_head`: it returns ``None``
    while more bytes are needed, the parsed :class:`RequestHead` once the blank line has arrived and every
    check passed, or raises :class:`RequestRejected`. :attr:`buffered` then holds
    the head (without the empty lines before it, which RFC 9112 §2.2 says to ignore) and what followed it.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._start = 0  # first byte of the request line (empty lines before it are skipped)
        self._scanned = 0  # bytes already checked
        self._line_start = 0  # first byte of the line being scanned
        self._method_end: int | None = None  # index of the SP after the method, once seen
        self._target_end: int | None = None  # index of the SP after the target, once seen
        self._request_line: tuple[str, str, str] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: RequestHead | None = None

    def feed(self, data: bytes | bytearray) -> None:
        """Append bytes received from the client."""
        self._buffer += data

    @property
    def has_data(self) -> bool:
        """Whether any byte of the next request has arrived (the header timeout runs from the first byte)."""
        return bool(self._buffer)

    @property
    def remainder(self) -> bytes:
        """The bytes after a complete head (the start of the body, or a pipelined request)."""
        return bytes(self._buffer[self._scanned :]) if self._head is not None else b""

    @property
    def buffered(self) -> bytes:
        """The bytes from the request line on, including what followed the head (body, pipelined requests)."""
        return bytes(self._buffer[self._start :])

    def partial_head(self) -> RequestHead | None:
        """The head as far as it has been parsed; ``None`` until the request line is complete."""
        if self._head is not None:
            return self._head
        if self._request_line is None:
            return None
        method, target, version = self._request_line
        return RequestHead(method, target, tuple(self._headers), version)

    def next_head(self) -> RequestHead | None:
        """Scan what has been fed so far; see the class docstring."""
        if self._head is not None:
            return self._head
        if self._scanned == 0:
            head = self._whole_head()
            if head is not None:
                return head
        buffer = self._buffer
        window_end = min(len(buffer), self._limits.max_header_bytes)
        while True:
            newline = buffer.find(b"\n", self._scanned, window_end)
            line_end = window_end if newline == -1 else newline
            if self._request_line is None:
                self._check_partial_request_line(line_end)
            if newline == -1:
                self._scanned = window_end
                if len(buffer) > self._limits.max_header_bytes:
                    self._reject("request header block too large", 431)
                return None
            if newline == self._line_start or buffer[newline - 1] != 0x0D:
                self._reject("bare LF line ending in the request head", 400)
            line = bytes(buffer[self._line_start : newline - 1])
            if b"\r" in line:
                self._reject("bare CR in the request head", 400)
            self._scanned = self._line_start = newline + 1
            if self._request_line is None:
                if not line and self._method_end is None:
                    self._start = self._line_start  # an empty line before the request line
                    continue
                self._parse_request_line(line)
            elif line:
                self._parse_header_line(line)
            else:
                self._head = self._finish()
                return self._head

    def _whole_head(self) -> RequestHead | None:
        """The usual case, at a fraction of the line-by-line cost: the whole head arrived in the first read and
        every line is plainly well-formed. Anything unusual returns None, and the line-by-line scan (the only
        one that refuses, with its precise reason) takes over from the start."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, self._limits.max_header_bytes)
        if end <= 0:
            return None
        block = bytes(buffer[:end])
        if block.count(b"\n") != block.count(b"\r"):  # a bare CR or LF somewhere: let the scan name it
            return None
        lines = block.split(b"\r\n")
        if len(lines) - 1 > self._limits.max_header_count:
            return None
        request_line = _PLAIN_REQUEST_LINE_RE.fullmatch(lines[0])
        if request_line is None or len(request_line[2]) > self._limits.max_target_bytes:
            return None
        method = request_line[1].decode("ascii")
        if method == "CONNECT":
            return None
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            field = _PLAIN_FIELD_RE.fullmatch(line)
            if field is None:
                return None
            headers.append((field[1].lower(), field[2]))
        self._request_line = (method, request_line[2].decode("ascii"), request_line[3].decode("ascii"))
        self._headers = headers
        self._method_end = self._target_end = 0  # only read while the request line is incomplete
        self._scanned = self._line_start = end + 4
        self._head = self._finish()
        return self._head

    # -- the request line -----------------------------------------------------------------------------------

    def _check_partial_request_line(self, end: int) -> None:
        """Refuse what an incomplete request line already shows: a non-token method or an overlong target."""
        buffer = self._buffer
        position = self._scanned
        if self._method_end is None:
            space = buffer.find(b" ", position, end)
            method_end = end if space == -1 else space
            for byte in buffer[position:method_end]:
                if byte not in _TCHAR and byte != 0x0D:
                    # Catches a TLS ClientHello (0x16), NUL and leading whitespace at the first byte.
                    self._reject("malformed request line", 400)
            if space == -1:
                return
            if space == self._start:
                self._reject("malformed request line", 400)
            self._method_end = space
        if self._target_end is not None:
            return
        target_start = self._method_end + 1
        space = buffer.find(b" ", max(position, target_start), end)
        target_end = end if space == -1 else space
        if target_end - target_start > self._limits.max_target_bytes:
            self._reject("request target too long", 414)
        if space != -1:
            self._target_end = space

    def _parse_request_line(self, line: bytes) -> None:
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[1]:
            self._reject("malformed request line", 400)
        raw_method, raw_target, raw_version = parts
        if _TOKEN_RE.fullmatch(raw_method) is None:
            self._reject("malformed request line", 400)
        if len(raw_target) > self._limits.max_target_bytes:
            self._reject("request target too long", 414)
        version = _VERSION_RE.fullmatch(raw_version)
        if version is None:
            self._reject("malformed request line", 400)
        if not all(0x21 <= byte <= 0x7E for byte in raw_target):
            self._reject("malformed request target", 400)
        method = raw_method.decode("ascii")
        http_version = f"{version[1].decode()}.{version[2].decode()}"
        self._request_line = (method, raw_target.decode("ascii"), http_version)
        if http_version not in _SUPPORTED_VERSIONS:
            self._reject("HTTP version not supported", 505)
        if method == "CONNECT":
            self._reject("CONNECT is not supported", 405)
        if not raw_target.startswith(b"/"):
            # absolute-form (a proxy request, or SSRF bait), authority-form and asterisk-form (OPTIONS *).
            self._reject("only origin-form request targets are accepted", 400)

    # -- header lines ---------------------------------------------------------------------------------------

    def _parse_header_line(self, line: bytes) -> None:
        if line[0] in _OWS:
            self._reject("obsolete line folding in the request head", 400)
        if len(self._headers) >= self._limits.max_header_count:
            self._reject("too many request headers", 431)
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN_RE.fullmatch(name) is None:
            self._reject("malformed header line", 400)
        if b"_" in name:
            # Envoy's edge default: `x_api_key` and `x-api-key` must not be two spellings of one header.
            self._reject("underscore in a header name", 400)
        value = value.strip(_OWS)
        if _BAD_VALUE_RE.search(value) is not None:
            self._reject("control character in a header value", 400)
        self._headers.append((name.lower(), value))

    def _finish(self) -> RequestHead:
        """Checks that need the whole head."""
        assert self._request_line is not None
        method, target, version = self._request_line
        head = RequestHead(method, target, tuple(self._headers), version)
        transfer_encodings = [value for name, value in head.headers if name == b"transfer-encoding"]
        content_lengths = [value for name, value in head.headers if name == b"content-length"]
        hosts = sum(1 for name, _ in head.headers if name == b"host")
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._reject("an HTTP/1.1 request needs exactly one Host header", 400, head)
        if any(name == b"upgrade" for name, _ in head.headers):
            self._reject("protocol upgrades are not supported", 400, head)
        if transfer_encodings:
            if content_lengths:
                self._reject("Content-Length together with Transfer-Encoding", 400, head)
            if version != "1.1":
                self._reject("Transfer-Encoding in an HTTP/1.0 request", 400, head)
            if len(transfer_encodings) != 1 or transfer_encodings[0].lower() != b"chunked":
                self._reject("Transfer-Encoding other than chunked", 400, head)
        declared = _largest_content_length(content_lengths)
        if declared is not None and declared > self._limits.max_body_bytes:
            self._reject("request body too large", 413, head)
        return head

    def _reject(self, message: str, status: int, head: RequestHead | None = None) -> NoReturn:
        if head is None:
            head = self.partial_head()
        raise RequestRejected(message, status_hint=status, head=head)


def _largest_content_length(values: list[bytes]) -> int | None:
    """The largest well-formed value of the Content-Length headers; malformed ones are refused
    by :func:`trioproxy.http1.request_framing`."""
    largest: int | None = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(_OWS)
            if item.isdigit():
                largest = max(largest or 0, int(item))
    return largest
