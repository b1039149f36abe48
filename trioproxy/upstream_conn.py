"""One HTTP/1.1 client connection to a provider: open it, run exchanges over it, say if it can be reused.

The bytes are framed by the sans-IO :mod:`trioproxy.http1`.

The pool (:mod:`trioproxy.pool`) owns the bookkeeping; this module owns the bytes. An
:class:`UpstreamConnection` runs one exchange at a time: :meth:`UpstreamConnection.start` sends the request
and reads the response head, :meth:`UpstreamResponse.receive_some` reads the body, and
:meth:`UpstreamConnection.finish_cycle` says whether the connection is clean enough for the next exchange.

Timeouts (each deadline scope wraps exactly one await, so a timeout names a phase):

- connect: name resolution, TCP connect and TLS handshake together (:func:`open_upstream_connection`);
- first_byte: from the moment we start sending the request until the response head is complete; the send and
  each read of the head share this one deadline, so a provider that neither reads nor answers is caught too;
- idle: between two reads of the response body (right for token streams that pause between chunks).

Error handling: every failure becomes a :class:`~trioproxy.errors.TrioProxyError`. Messages never quote header
values or the bytes that failed to parse: an ``Authorization`` header must not reach a log line.
"""

from __future__ import annotations

import socket as stdlib_socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from trioproxy.errors import (
    PoolClosedError,
    UpstreamConnectError,
    UpstreamDiedError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from trioproxy.http1 import (
    BodyDecoder,
    Framing,
    HTTPFramingError,
    ResponseHead,
    has_connection_token,
    parse_response_head,
    request_framing,
    response_framing,
    serialize_request_head,
)
from trioproxy.snapshot import Origin
from trioproxy.sockets import FastSocketStream, receive_some_before, send_all_before

# One read from the provider: httpcore and hypercorn use 64 KiB; a token stream's chunks are far smaller.
RECEIVE_SIZE = 64 * 1024

# How long a wait for the provider may last before the exchange's ``on_slow`` hook runs (the server uses it to
# start watching the client for a hang-up: a watcher task costs more than a whole fast exchange). Well above
# what a saturated event loop adds to a fast exchange (at 64 connections on one core, p99 ~80 ms), so overload
# does not spawn watchers and feed itself; well below any real model's time to answer.
SLOW_WAIT = 0.25

# Closing never needs the provider's cooperation (no close_notify), so this only bounds a pathological close.
CLOSE_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """A request exactly as it goes on the wire; the forwarder has already built every header."""

    method: bytes
    target: bytes  # path prefix, path and query
    headers: list[tuple[bytes, bytes]]  # complete (host, auth, content-length ...): sent as given
    body: bytes

    def __repr__(self) -> str:
        # Header values may carry provider secrets; a repr never shows them.
        return f"UpstreamRequest({self.method!r}, {len(self.headers)} headers, {len(self.body)} body bytes)"


@dataclass(frozen=True, slots=True)
class ExchangeTimeouts:
    connect: float  # TCP connect + TLS handshake (and, in the pool, waiting for a free slot)
    first_byte: float  # from request sent to response head
    idle: float  # between two reads of the response body


class StaleConnectionError(Exception):
    """A reused keep-alive connection turned out dead before the provider could have answered.

    Raised by :meth:`UpstreamConnection.start` only when (1) the connection already carried a complete
    exchange, and (2) either sending the request failed (broken pipe, reset), or the first read after sending
    returned EOF or a reset with zero response bytes received. That is the keep-alive race of RFC 9112 section
    9.3.1: the provider closed an idle connection while our request was in flight, so the request never
    reached its application. The pool retries such a request once, on a freshly opened connection. Never
    user-visible.

    The one assumption (shared with urllib3 and http.client's ``RemoteDisconnected``): a server closes a
    keep-alive connection only between requests. A broken server that reads a whole request and then closes
    without sending one response byte would see that request twice. A fresh connection is never retried, and
    nothing is retried once a response byte arrived or a timeout fired.
    """


def _label(origin: Origin) -> str:
    return f"{origin.scheme}://{origin.host_header}"


class UpstreamResponse:
    """The head of a provider's response and a reader for its body.

    ``headers`` carry lower-cased names, values as received (without surrounding whitespace).
    """

    __slots__ = ("_connection", "_idle", "headers", "http_version", "reason", "status")

    def __init__(
        self, connection: UpstreamConnection, head: ResponseHead, timeouts: ExchangeTimeouts
    ) -> None:
        self.status: int = head.status
        self.reason: bytes = head.reason
        self.headers: list[tuple[bytes, bytes]] = head.headers
        self.http_version: bytes = head.http_version
        self._connection = connection
        self._idle = timeouts.idle

    async def receive_some(self) -> bytes:
        """Return the next body bytes (HTTP framing removed); ``b""`` once the body ended cleanly.

        Error handling: raises UpstreamTimeoutError when no byte arrives within ``idle``, UpstreamDiedError
        when the provider closes a framed body early, UpstreamProtocolError on malformed framing. After the
        clean end it keeps returning ``b""``, like a stream at EOF.
        """
        return await self._connection.receive_body(self._idle)

    @property
    def complete(self) -> bool:
        """True once the whole body was read."""
        return self._connection.body_complete

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} complete={self.complete}>"


class UpstreamConnection:
    """An open connection to one origin and the framing state of its current exchange.

    Resource handling: the pool owns it; whoever takes it out of the pool either gives it back or closes it.
    :meth:`aclose` is idempotent and bounded.
    """

    def __init__(
        self, origin: Origin, stream: trio.abc.Stream, sock: _Pollable, *, max_head_bytes: int
    ) -> None:
        self.origin = origin
        self._stream = stream
        self._socket = sock  # the TCP socket under any TLS layer, for the readability check
        self._max_head_bytes = max_head_bytes
        self.exchanges = 0  # exchanges started on this connection
        self._expires_at: float | None = None  # set while idle in the pool
        self._closed = False
        self._eof = False
        self._in_exchange = False  # between start() and a successful finish_cycle()
        self._received_this_cycle = 0
        self._decoder: BodyDecoder | None = None
        self._pending = b""  # body bytes that arrived with the response head, not yet decoded
        self._keep_alive = False
        self._on_slow: Callable[[], None] | None = None  # run once, the first time a wait passes SLOW_WAIT

    # -- predicates the pool's bookkeeping asks --

    def is_idle(self) -> bool:
        """True while the connection sits idle in the pool."""
        return self._expires_at is not None

    def has_expired(self, now: float) -> bool:
        """True if it has sat idle longer than the pool's idle expiry."""
        return self._expires_at is not None and now >= self._expires_at

    def is_available(self) -> bool:
        """True if it could carry a new exchange right now.

        The readability check is a non-blocking poll of the socket: an idle HTTP/1.1 connection has nothing to
        say, so readable means the provider closed it (EOF) or sent garbage; either way it must not be reused.
        """
        if self._closed or self._in_exchange or self._eof:
            return False
        try:
            return not self._socket.is_readable()
        except (OSError, ValueError):  # ValueError: the socket is already closed
            return False

    def mark_idle(self, expires_at: float) -> None:
        self._expires_at = expires_at

    def mark_in_use(self) -> None:
        self._expires_at = None

    @property
    def body_complete(self) -> bool:
        return self._decoder is not None and self._decoder.done

    # -- one exchange --

    async def start(
        self,
        request: UpstreamRequest,
        timeouts: ExchangeTimeouts,
        on_slow: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """Send ``request`` and read the response head, skipping informational (1xx) responses.

        ``on_slow`` runs once, the first time this exchange waits for the provider longer than ``SLOW_WAIT``.

        Error handling: StaleConnectionError (see its docstring) on a reused connection that died before any
        response byte; otherwise UpstreamTimeoutError, UpstreamDiedError or UpstreamProtocolError.
        """
        reused = self.exchanges > 0
        self.exchanges += 1
        self._received_this_cycle = 0
        self._in_exchange = True
        self._decoder = None
        self._pending = b""
        self._on_slow = on_slow
        try:
            framing, _ = request_framing(request.headers)
            if request.body and framing is not Framing.LENGTH:
                raise HTTPFramingError("a request body needs a Content-Length")
            wire = serialize_request_head(request.method, request.target, request.headers) + request.body
        except HTTPFramingError:
            raise UpstreamProtocolError(
                "the request cannot be framed as HTTP/1.1 (invalid method, target, headers or body length)"
            ) from None
        deadline = trio.current_time() + timeouts.first_byte
        try:
            sent = await send_all_before(self._stream, wire, deadline)
        except trio.BrokenResourceError:
            if reused:
                raise StaleConnectionError from None
            raise UpstreamDiedError(
                f"{_label(self.origin)} closed the connection while receiving the request"
            ) from None
        except trio.ClosedResourceError:
            raise PoolClosedError("the upstream connection pool closed this connection") from None
        if not sent:
            raise UpstreamTimeoutError(
                f"{_label(self.origin)} did not take the request within {timeouts.first_byte:g}s"
            )
        buffer = b""
        while True:
            try:
                parsed = parse_response_head(buffer, self._max_head_bytes)
            except HTTPFramingError as exc:
                raise self._head_error(exc) from None
            if parsed is None:
                if self._eof:
                    if reused and self._received_this_cycle == 0:
                        raise StaleConnectionError
                    where = "in the middle of the response head" if buffer else "before responding"
                    raise UpstreamDiedError(f"upstream {_label(self.origin)} closed the connection {where}")
                try:
                    data = await self._receive(deadline)
                except trio.BrokenResourceError:
                    if reused and self._received_this_cycle == 0:
                        raise StaleConnectionError from None
                    raise UpstreamDiedError(
                        f"{_label(self.origin)} reset the connection before responding"
                    ) from None
                if data is None:
                    raise UpstreamTimeoutError(
                        f"{_label(self.origin)} sent no response head within {timeouts.first_byte:g}s"
                    )
                buffer += data
                continue
            head, consumed = parsed
            buffer = buffer[consumed:]
            if head.status == 101:
                raise UpstreamProtocolError(
                    f"{_label(self.origin)} switched protocols, which is not supported"
                )
            if head.status < 200:
                continue  # 100 Continue, 103 Early Hints: the final response follows
            try:
                framing, length = response_framing(request.method, head.status, head.headers)
            except HTTPFramingError:
                raise UpstreamProtocolError(
                    f"{_label(self.origin)} sent a malformed HTTP/1.1 response"
                ) from None
            self._decoder = BodyDecoder(framing, length)
            self._pending = buffer
            self._keep_alive = (
                head.http_version == b"1.1"
                and framing is not Framing.CLOSE
                and not has_connection_token(head.headers, b"close")
            )
            return UpstreamResponse(self, head, timeouts)

    def _head_error(self, exc: HTTPFramingError) -> UpstreamProtocolError:
        label = _label(self.origin)
        if exc.status_hint == 431:
            return UpstreamProtocolError(f"the response head of {label} exceeds {self._max_head_bytes} bytes")
        return UpstreamProtocolError(f"{label} sent a malformed HTTP/1.1 response")

    async def receive_body(self, idle: float) -> bytes:
        """The body reader behind :meth:`UpstreamResponse.receive_some`."""
        decoder = self._decoder
        assert decoder is not None, "receive_body() before start()"
        try:
            if self._pending:
                pending, self._pending = self._pending, b""
                piece = decoder.feed(pending)
                if piece:
                    return piece
            while not decoder.done:
                if self._eof:
                    decoder.close()
                    break
                try:
                    data = await self._receive(trio.current_time() + idle)
                except trio.BrokenResourceError:
                    raise UpstreamDiedError(f"{_label(self.origin)} reset the connection mid-body") from None
                if data is None:
                    raise UpstreamTimeoutError(f"{_label(self.origin)} sent nothing for {idle:g}s mid-body")
                if not data:
                    continue  # EOF: the loop's first check ends or refuses the body
                piece = decoder.feed(data)
                if piece:
                    return piece
        except HTTPFramingError as exc:
            if exc.status_hint == 502:
                raise UpstreamDiedError(
                    f"upstream {_label(self.origin)} closed the connection mid-body"
                ) from None
            raise UpstreamProtocolError(f"{_label(self.origin)} sent a malformed HTTP/1.1 response") from None
        return b""

    def finish_cycle(self) -> bool:
        """After an exchange, prepare for the next one; False if the connection must be closed instead.

        Reusable only if the response was read to its end, neither side asked to close (HTTP/1.0,
        ``Connection: close``, a close-delimited body), and nothing unexpected follows the response.
        """
        decoder = self._decoder
        if (
            self._closed
            or self._eof
            or decoder is None
            or not decoder.done
            or decoder.trailing
            or self._pending
            or not self._keep_alive
        ):
            return False
        self._in_exchange = False
        return True

    async def aclose(self) -> None:
        """Close the connection within a bounded shield; idempotent.

        TLS streams are https_compatible, so closing sends no close_notify and never waits on the provider.
        """
        self._closed = True
        with trio.move_on_after(CLOSE_GRACE, shield=True):
            await self._stream.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- helpers --

    async def _receive(self, deadline: float) -> bytes | None:
        """One read from the transport (``b""`` is EOF), or None if ``deadline`` passed first."""
        try:
            on_slow = self._on_slow
            if on_slow is not None and (soon := trio.current_time() + SLOW_WAIT) < deadline:
                data = await receive_some_before(self._stream, soon, RECEIVE_SIZE)
                if data is None:
                    self._on_slow = None
                    on_slow()
                    data = await receive_some_before(self._stream, deadline, RECEIVE_SIZE)
            else:
                data = await receive_some_before(self._stream, deadline, RECEIVE_SIZE)
        except trio.ClosedResourceError:
            raise PoolClosedError("the upstream connection pool closed this connection") from None
        if data is None:
            return None
        if not data:
            self._eof = True
        self._received_this_cycle += len(data)
        return data

    def __repr__(self) -> str:
        if self._closed:
            state = "CLOSED"
        elif self.is_idle():
            state = "IDLE"
        else:
            state = "ACTIVE"
        return f"<UpstreamConnection {_label(self.origin)} [{state}, exchanges: {self.exchanges}]>"


async def open_upstream_connection(
    origin: Origin,
    *,
    ssl_context: ssl.SSLContext,
    address_allowed: Callable[[str], bool],
    connect_timeout: float,
    max_head_bytes: int,
) -> UpstreamConnection:
    """Resolve, SSRF-check, connect and (for https) TLS-handshake, all within ``connect_timeout``.

    Every resolved address is passed to ``address_allowed`` right before connecting, so a name that was
    checked when the provider was configured cannot later be re-pointed (DNS rebinding) at a private address.
    Allowed addresses are tried in resolver order.

    Error handling: UpstreamConnectError when the name does not resolve, no address is allowed, every connect
    fails, or the handshake fails; a timeout is an UpstreamConnectError with status hint 504, because nothing
    was sent yet (a caller may retry it elsewhere).
    """
    try:
        with trio.fail_after(connect_timeout):
            stream, sock = await _open_stream(origin, ssl_context, address_allowed)
    except trio.TooSlowError:
        raise UpstreamConnectError(
            f"connecting to {_label(origin)} took longer than {connect_timeout:g}s", status_hint=504
        ) from None
    return UpstreamConnection(origin, stream, sock, max_head_bytes=max_head_bytes)


class _Pollable(Protocol):
    def is_readable(self) -> bool: ...


async def _open_stream(
    origin: Origin, ssl_context: ssl.SSLContext, address_allowed: Callable[[str], bool]
) -> tuple[trio.abc.Stream, _Pollable]:
    label = _label(origin)
    try:
        infos = await trio.socket.getaddrinfo(origin.host, origin.port, type=stdlib_socket.SOCK_STREAM)
    except OSError:
        raise UpstreamConnectError(f"cannot resolve the host of {label}") from None
    allowed = [info for info in infos if address_allowed(str(info[4][0]))]
    if not allowed:
        raise UpstreamConnectError(f"{label} resolves only to addresses that are not allowed")
    connected: trio.socket.SocketType | None = None
    for family, type_, proto, _, sockaddr in allowed:
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
            await sock.connect(sockaddr)
        except OSError:
            sock.close()
            continue
        except BaseException:
            sock.close()
            raise
        connected = sock
        break
    if connected is None:
        raise UpstreamConnectError(f"cannot connect to {label}")
    if origin.scheme != "https":
        fast = FastSocketStream.from_trio_socket(connected)
        return fast, fast
    tcp = trio.SocketStream(connected)
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=origin.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        reason = exc.__cause__.reason if isinstance(exc.__cause__, ssl.SSLError) else None
        detail = f" ({reason})" if reason else ""
        raise UpstreamConnectError(f"TLS handshake with {label} failed{detail}") from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls, tcp.socket
