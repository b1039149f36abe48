"""One HTTP/1.1 client connection to a provider: open it, run h11 exchanges over it, say if it can be reused.

The pool (:mod:`trioproxy.pool`) owns the bookkeeping; this module owns the bytes. An
:class:`UpstreamConnection` runs one exchange at a time: :meth:`UpstreamConnection.start` sends the request
and reads the response head, :meth:`UpstreamResponse.receive_some` reads the body, and
:meth:`UpstreamConnection.finish_cycle` says whether the connection is clean enough for the next exchange.

Timeouts (each :func:`trio.fail_after`/:func:`trio.fail_at` wraps exactly one await, so a timeout names a
phase):

- connect: name resolution, TCP connect and TLS handshake together (:func:`open_upstream_connection`);
- first_byte: from the moment we start sending the request until the response head is complete; the send and
  each read of the head share this one deadline, so a provider that neither reads nor answers is caught too;
- idle: between two reads of the response body (right for token streams that pause between chunks).

Error handling: every failure becomes a :class:`~trioproxy.errors.TrioProxyError`. Messages never quote header
values or h11's own messages (which may quote them): an ``Authorization`` header must not reach a log line.
"""

from __future__ import annotations

import socket as stdlib_socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from trioproxy.errors import (
    PoolClosedError,
    UpstreamConnectError,
    UpstreamDiedError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from trioproxy.snapshot import Origin

# One read from the provider: httpcore and hypercorn use 64 KiB; a token stream's chunks are far smaller.
RECEIVE_SIZE = 64 * 1024

# Closing never needs the provider's cooperation (no close_notify), so this only bounds a pathological close.
CLOSE_GRACE = 1.0

# The status line and header block of a response as h11 frames them, beyond the raw header pairs.
_HEAD_OVERHEAD = len(b"HTTP/1.1 200 \r\n\r\n")


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

    ``headers`` carry lower-cased names (h11 normalises them), values as received.
    """

    def __init__(
        self, connection: UpstreamConnection, head: h11.Response, timeouts: ExchangeTimeouts
    ) -> None:
        self.status: int = head.status_code
        self.reason: bytes = bytes(head.reason)
        self.headers: list[tuple[bytes, bytes]] = [(bytes(n), bytes(v)) for n, v in head.headers]
        self.http_version: bytes = bytes(head.http_version)
        self._connection = connection
        self._timeouts = timeouts

    async def receive_some(self) -> bytes:
        """Return the next body bytes (HTTP framing removed); ``b""`` once the body ended cleanly.

        Error handling: raises UpstreamTimeoutError when no byte arrives within ``idle``, UpstreamDiedError
        when the provider closes a framed body early, UpstreamProtocolError on malformed framing. After the
        clean end it keeps returning ``b""``, like a stream at EOF.
        """
        return await self._connection.receive_body(self._timeouts.idle)

    @property
    def complete(self) -> bool:
        """True once the whole body was read (h11 saw its end)."""
        return self._connection.body_complete

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} complete={self.complete}>"


class UpstreamConnection:
    """An open connection to one origin plus its h11 client state.

    Resource handling: the pool owns it; whoever takes it out of the pool either gives it back or closes it.
    :meth:`aclose` is idempotent and bounded.
    """

    def __init__(
        self, origin: Origin, stream: trio.abc.Stream, sock: trio.socket.SocketType, *, max_head_bytes: int
    ) -> None:
        self.origin = origin
        self._stream = stream
        self._socket = sock  # the raw TCP socket under any TLS layer, for the readability check
        self._max_head_bytes = max_head_bytes
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self.exchanges = 0  # exchanges started on this connection
        self._expires_at: float | None = None  # set while idle in the pool
        self._closed = False
        self._eof = False
        self._received_this_cycle = 0
        self.body_complete = False

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
        if self._closed or self._h11.our_state is not h11.IDLE or self._h11.their_state is not h11.IDLE:
            return False
        try:
            return not self._socket.is_readable()
        except (OSError, ValueError):  # ValueError: the socket is already closed
            return False

    def mark_idle(self, expires_at: float) -> None:
        self._expires_at = expires_at

    def mark_in_use(self) -> None:
        self._expires_at = None

    # -- one exchange --

    async def start(self, request: UpstreamRequest, timeouts: ExchangeTimeouts) -> UpstreamResponse:
        """Send ``request`` and read the response head, skipping informational (1xx) responses.

        Error handling: StaleConnectionError (see its docstring) on a reused connection that died before any
        response byte; otherwise UpstreamTimeoutError, UpstreamDiedError or UpstreamProtocolError.
        """
        reused = self.exchanges > 0
        self.exchanges += 1
        self._received_this_cycle = 0
        self.body_complete = False
        try:
            parts = [
                self._h11.send(
                    h11.Request(method=request.method, target=request.target, headers=request.headers)
                )
            ]
            if request.body:
                parts.append(self._h11.send(h11.Data(data=request.body)))
            parts.append(self._h11.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            # h11's message may quote a header value: keep it out of ours, and break the chain.
            raise UpstreamProtocolError(
                "the request cannot be framed as HTTP/1.1 (invalid method, target, headers or body length)"
            ) from None
        wire = b"".join(p for p in parts if p is not None)
        deadline = trio.current_time() + timeouts.first_byte
        try:
            with trio.fail_at(deadline):
                await self._stream.send_all(wire)
        except trio.TooSlowError:
            raise UpstreamTimeoutError(
                f"{_label(self.origin)} did not take the request within {timeouts.first_byte:g}s"
            ) from None
        except trio.BrokenResourceError:
            if reused:
                raise StaleConnectionError from None
            raise UpstreamDiedError(
                f"{_label(self.origin)} closed the connection while receiving the request"
            ) from None
        except trio.ClosedResourceError:
            raise PoolClosedError("the upstream connection pool closed this connection") from None
        while True:
            event = self._next_event(in_body=False)
            if event is h11.NEED_DATA:
                try:
                    with trio.fail_at(deadline):
                        await self._receive()
                except trio.TooSlowError:
                    raise UpstreamTimeoutError(
                        f"{_label(self.origin)} sent no response head within {timeouts.first_byte:g}s"
                    ) from None
                except trio.BrokenResourceError:
                    if reused and self._received_this_cycle == 0:
                        raise StaleConnectionError from None
                    raise UpstreamDiedError(
                        f"{_label(self.origin)} reset the connection before responding"
                    ) from None
                if self._eof and reused and self._received_this_cycle == 0:
                    raise StaleConnectionError
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                head_bytes = (
                    _HEAD_OVERHEAD + len(event.reason) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                )
                if head_bytes > self._max_head_bytes:
                    raise UpstreamProtocolError(
                        f"the response head of {_label(self.origin)} exceeds {self._max_head_bytes} bytes"
                    )
                return UpstreamResponse(self, event, timeouts)
            if event is h11.PAUSED:
                # Only an Upgrade/CONNECT request can get here; the forwarder never sends one.
                raise UpstreamProtocolError(
                    f"{_label(self.origin)} switched protocols, which is not supported"
                )
            # ConnectionClosed: EOF where a response head should start.
            raise UpstreamDiedError(f"{_label(self.origin)} closed the connection before responding")

    async def receive_body(self, idle: float) -> bytes:
        """The body reader behind :meth:`UpstreamResponse.receive_some`."""
        while True:
            if self.body_complete:
                return b""
            event = self._next_event(in_body=True)
            if event is h11.NEED_DATA:
                try:
                    with trio.fail_after(idle):
                        await self._receive()
                except trio.TooSlowError:
                    raise UpstreamTimeoutError(
                        f"{_label(self.origin)} sent nothing for {idle:g}s mid-body"
                    ) from None
                except trio.BrokenResourceError:
                    raise UpstreamDiedError(f"{_label(self.origin)} reset the connection mid-body") from None
                continue
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                self.body_complete = True
                return b""
            raise UpstreamProtocolError(
                f"unexpected {type(event).__name__} in the body of {_label(self.origin)}"
            )

    def finish_cycle(self) -> bool:
        """After an exchange, prepare for the next one; False if the connection must be closed instead.

        Reusable only if h11 says both sides are DONE (so the response was read to its end and did not say
        ``Connection: close``, which h11 turns into MUST_CLOSE), nothing unexpected follows the response, and
        ``start_next_cycle()`` succeeds.
        """
        if self._closed or self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        trailing, closed = self._h11.trailing_data
        if trailing or closed:
            return False
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:
            return False
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

    async def _receive(self) -> None:
        """One read from the transport, fed to h11 (an empty read is EOF)."""
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except trio.ClosedResourceError:
            raise PoolClosedError("the upstream connection pool closed this connection") from None
        if not data:
            self._eof = True
        self._received_this_cycle += len(data)
        self._h11.receive_data(bytes(data))

    def _next_event(self, *, in_body: bool) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            label = _label(self.origin)
            if self._eof:
                if in_body:
                    where = "mid-body"
                elif self._received_this_cycle:
                    where = "in the middle of the response head"
                else:
                    where = "before responding"
                raise UpstreamDiedError(f"upstream {label} closed the connection {where}") from None
            if exc.error_status_hint == 431:
                raise UpstreamProtocolError(
                    f"the response head of {label} exceeds {self._max_head_bytes} bytes"
                ) from None
            raise UpstreamProtocolError(f"{label} sent a malformed HTTP/1.1 response") from None

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


async def _open_stream(
    origin: Origin, ssl_context: ssl.SSLContext, address_allowed: Callable[[str], bool]
) -> tuple[trio.abc.Stream, trio.socket.SocketType]:
    label = _label(origin)
    try:
        infos = await trio.socket.getaddrinfo(origin.host, origin.port, type=stdlib_socket.SOCK_STREAM)
    except OSError:
        raise UpstreamConnectError(f"cannot resolve the host of {label}") from None
    allowed = [info for info in infos if address_allowed(str(info[4][0]))]
    if not allowed:
        raise UpstreamConnectError(f"{label} resolves only to addresses that are not allowed")
    tcp: trio.SocketStream | None = None
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
        tcp = trio.SocketStream(sock)
        break
    if tcp is None:
        raise UpstreamConnectError(f"cannot connect to {label}")
    if origin.scheme != "https":
        return tcp, tcp.socket
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
