"""The client-facing HTTP/1.1 server of the data plane: sans-IO framing on trio, one task per connection.

A connection runs request cycles until the client closes, idles, asks to close, or hits a limit. Each cycle:

1. wait for the first byte (``keepalive_timeout`` between requests, ``header_timeout`` on a new connection;
   both close silently), then collect the head within ``header_timeout`` (408) while
   :class:`~trioproxy.request_guard.HeadScanner` refuses anything ambiguous or oversized;
2. take the body's framing from the head that passed (:mod:`trioproxy.http1`: Content-Length values must
   agree, chunked syntax is strict), send ``100 Continue`` if the client waits for it, and read the whole body (``body_read_timeout`` between reads: 408; ``max_body_bytes``: 413);
3. run the handler; when it is about to wait (the forwarder asks once the provider took ``SLOW_WAIT``), a
   sibling task in the connection's nursery watches the socket: EOF or a reset sets ``request.disconnected``
   and cancels the handler, so an upstream read in it stops at once. Bytes of a pipelined next request that
   arrive meanwhile are kept and answered after this one, never interleaved.

Rejections are built by the :class:`Rejector` (a JSON body in the client's dialect), sent with
``connection: close``; then the server half-closes, discards what the client still sends for a moment (so the
kernel answers the unread bytes with a FIN rather than a reset that could destroy the answer in flight), and
closes. Nothing after a refused head is ever parsed. After an abort, an error or a cancellation the connection
is closed, never reused; it is reused only when the answer ended cleanly and neither side asked to close
(HTTP/1.0, ``Connection: close``, a close-delimited answer).

Resource handling: every connection task lives in the server's own nursery and closes its stream on the way
out; :meth:`ProxyServer.drain` closes the listeners and the idle connections, then moves that nursery's
deadline to the drain deadline (the hypercorn way), so nothing outlives it.

Error handling: no exception of a client or a handler escapes a connection task. A handler exception is
logged (its type and traceback, its message only for our own errors, which never carry secrets) and answered
500 if no byte of the answer was sent, else the connection is aborted. ``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import traceback

import trio

from trioproxy.errors import ClientGoneError, TrioProxyError
from trioproxy.exchange import (
    FRAMING_HEADERS,
    BrokenStream,
    ClientRequest,
    Handler,
    Headers,
    Rejector,
    ResponseSink,
    reason_phrase,
)
from trioproxy.http1 import (
    CONTINUE_RESPONSE,
    BodyDecoder,
    HTTPFramingError,
    check_header_values,
    has_connection_token,
    request_framing,
    serialize_response_head,
)
from trioproxy.request_guard import HeadScanner, RequestHead, RequestRejected
from trioproxy.settings import ServerLimits
from trioproxy.sockets import FastSocketStream

logger = logging.getLogger(__name__)

# After a rejection: how long, and how much, we keep reading (and discarding) before the close, so the answer
# is not destroyed by a reset. nginx's lingering_time/lingering_timeout are 30 s/5 s; we only need the bytes
# already in flight (the plan bounds them at limit + 64 KiB).
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 64 * 1024
# accept() failing for lack of descriptors or memory: pause like trio.serve_listeners does, then retry.
_ACCEPT_RETRY_SECONDS = 0.1
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class ProxyServer:
    """The :8080 listener: connection tasks, keep-alive, limits and graceful drain.

    Use ``port = await nursery.start(server.serve, host, port)``; :meth:`drain` ends it gracefully, cancelling
    the nursery ends it at once.
    """

    def __init__(self, limits: ServerLimits, handler: Handler, rejector: Rejector) -> None:
        self._limits = limits
        self._handler = handler
        self._rejector = rejector
        self._listeners: list[trio.SocketListener] = []
        self._connections: set[_Connection] = set()
        self._connection_scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        self._draining = False
        self._active_requests = 0

    @property
    def active_requests(self) -> int:
        """Requests being answered: body read, handler not finished."""
        return self._active_requests

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def draining(self) -> bool:
        return self._draining

    async def serve(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the bound port via ``task_status.started(port)``, serve until cancelled or drained.

        ``reuse_port`` binds with ``SO_REUSEPORT``, so several worker processes listen on one port and the
        kernel spreads new connections among them (``trioproxy serve --workers N``).
        """
        if reuse_port:
            listeners = await _open_reuse_port_listeners(host, port)
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
        self._listeners = listeners
        self._stopped = stopped = trio.Event()
        bound_port: int = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as connections:
                self._connection_scope = connections.cancel_scope
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    task_status.started(bound_port)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self._connection_scope = None
            stopped.set()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, close idle keep-alive connections, let in-flight requests finish until ``deadline``
        (trio time), then cancel what is left. Returns when every connection task has ended."""
        self._draining = True
        for listener in self._listeners:
            await trio.aclose_forcefully(listener)
        for connection in list(self._connections):
            connection.close_if_idle()
        if self._connection_scope is not None:
            self._connection_scope.deadline = min(self._connection_scope.deadline, deadline)
        if self._stopped is not None:
            await self._stopped.wait()

    async def serve_stream(self, stream: trio.abc.HalfCloseableStream, peer_ip: str, peer_port: int) -> None:
        """Serve one already-accepted connection until it closes (the accept loop's per-connection task; also
        usable with an in-memory stream)."""
        connection = _Connection(self, stream, peer_ip, peer_port)
        self._connections.add(connection)
        await self._run_connection(connection)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # drain() closed the listener
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error("accept failed (%s); retrying", errno.errorcode[exc.errno])
                await trio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            if len(self._connections) >= self._limits.max_connections or self._draining:
                await trio.aclose_forcefully(stream)
                continue
            try:
                # Responses go out in one write per piece: no Nagle delay (trio sets it too; we rely on it).
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
                fast = FastSocketStream.from_trio_socket(stream.socket)
            except OSError:  # the client is already gone
                await trio.aclose_forcefully(stream)
                continue
            try:
                peer_ip, peer_port = fast.getpeername()
            except OSError:
                await trio.aclose_forcefully(fast)
                continue
            connection = _Connection(self, fast, peer_ip, peer_port)
            # Counted before the task runs, so a burst of accepts cannot overshoot the cap.
            self._connections.add(connection)
            nursery.start_soon(self._run_connection, connection)

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            # The connection's own nursery, for the disconnect watchers its requests may start.
            async with trio.open_nursery() as nursery:
                connection.nursery = nursery
                try:
                    await connection.run()
                except BrokenStream:
                    pass  # the client reset or closed the connection: nothing to answer
                except Exception:
                    logger.exception("connection task failed")
        finally:
            self._connections.discard(connection)
            await trio.aclose_forcefully(connection.stream)


class _DisconnectWatch:
    """Watches the client of one request for a hang-up, from the moment the handler asks.

    A watcher is a task, and a task costs more CPU than a whole fast exchange, so it is not started for every
    request: the handler calls :meth:`start` (``ClientRequest.watch_disconnect``) when it is about to wait,
    which the forwarder does once the provider has kept it waiting for ``SLOW_WAIT``. A client that leaves
    earlier is noticed then, or by the next write.
    """

    __slots__ = ("_connection", "_disconnected", "_done", "_handler_scope", "_scope", "_stopped", "kept")

    def __init__(
        self, connection: _Connection, handler_scope: trio.CancelScope, disconnected: trio.Event
    ) -> None:
        self._connection = connection
        self._handler_scope = handler_scope
        self._disconnected = disconnected
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self._stopped = False
        self.kept = bytearray()  # bytes of a pipelined next request read meanwhile

    def start(self) -> None:
        """Start watching (idempotent; a no-op once the request is answered)."""
        nursery = self._connection.nursery
        if self._done is not None or self._stopped or nursery is None:
            return
        self._done = trio.Event()
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run)

    async def stop(self) -> None:
        """Stop the watcher if it started, and wait until it let go of the socket."""
        self._stopped = True  # a late start() does nothing
        if self._done is None or self._scope is None:
            return
        self._scope.cancel()
        await self._done.wait()

    async def _run(self) -> None:
        assert self._scope is not None
        assert self._done is not None
        try:
            with self._scope:
                await self._connection._watch_client(self._handler_scope, self._disconnected, self.kept)
        finally:
            self._done.set()


class _ClientClosed(Exception):
    """The client closed its side in the middle of a request: nothing to answer."""


class _Connection:
    """One client connection: a loop of request cycles (see the module docstring)."""

    def __init__(
        self, server: ProxyServer, stream: trio.abc.HalfCloseableStream, peer_ip: str, peer_port: int
    ) -> None:
        self.stream = stream
        self._server = server
        self._limits = server._limits
        self._peer_ip = peer_ip
        self._peer_port = peer_port
        self._leftover = b""  # bytes of the next request that arrived with or during the previous one
        self._idle_scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None  # set by the server before run()

    def close_if_idle(self) -> None:
        """Called by drain: a connection waiting for its next request closes now."""
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def run(self) -> None:
        limit = self._limits.max_requests_per_connection
        for index in range(limit):
            try:
                keep_going = await self._cycle(first=index == 0, last=index + 1 >= limit)
            except RequestRejected as exc:
                await self._reject(exc.status_hint, exc.message, exc.head)
                return
            except (_ClientClosed, ClientGoneError):
                return
            if not keep_going:
                return

    async def _cycle(self, *, first: bool, last: bool) -> bool:
        scanner = HeadScanner(self._limits)
        scanner.feed(self._leftover)
        self._leftover = b""
        if not scanner.has_data:
            if self._server.draining:
                return False
            idle = self._limits.header_timeout if first else self._limits.keepalive_timeout
            data = await self._wait_first_bytes(idle)
            if not data:
                return False
            scanner.feed(data)
        head = await self._read_head(scanner)
        received_at = trio.current_time()
        try:
            framing, length = request_framing(head.headers)
        except HTTPFramingError as exc:
            raise RequestRejected(exc.message, status_hint=400, head=head) from None
        decoder = BodyDecoder(framing, length)
        body = await self._read_body(decoder, scanner.remainder, head)
        path, _, query = head.target.partition("?")
        request = ClientRequest(
            method=head.method,
            target=head.target,
            path=path,
            query=query,
            headers=list(head.headers),
            body=body,
            peer_ip=self._peer_ip,
            peer_port=self._peer_port,
            received_at=received_at,
            disconnected=trio.Event(),
        )
        keep_alive = (
            not last and head.http_version == "1.1" and not has_connection_token(head.headers, b"close")
        )
        return await self._respond(request, head, decoder, keep_alive=keep_alive)

    async def _wait_first_bytes(self, idle_seconds: float) -> bytes | bytearray:
        """The first bytes of the next request, or b"" if the connection closed, idled out or was drained."""
        stream = self.stream
        if type(stream) is FastSocketStream:
            # A new connection's request is usually there already: read it without a cancel scope.
            data = stream.receive_nowait()
            if data is not None:
                await trio.lowlevel.checkpoint()
                return data
        with trio.move_on_after(idle_seconds) as scope:
            self._idle_scope = scope
            try:
                return await self.stream.receive_some()
            finally:
                self._idle_scope = None
        return b""

    async def _read_head(self, scanner: HeadScanner) -> RequestHead:
        head = scanner.next_head()
        if head is not None:  # the usual case: the first read held the whole head
            return head
        with trio.move_on_after(self._limits.header_timeout):
            while (head := scanner.next_head()) is None:
                data = await self.stream.receive_some()
                if not data:
                    raise _ClientClosed
                scanner.feed(data)
            return head
        raise RequestRejected(
            "request head not received in time", status_hint=408, head=scanner.partial_head()
        )

    async def _read_body(self, decoder: BodyDecoder, initial: bytes, head: RequestHead) -> bytes:
        """The whole body (framing removed); bytes after it stay in ``decoder.trailing``."""
        try:
            body = decoder.feed(initial)
            size = len(body)
            if size > self._limits.max_body_bytes:
                raise RequestRejected("request body too large", status_hint=413, head=head)
            complete = decoder.done
            if complete:
                return body
            pieces = [body]
            if head.http_version == "1.1" and _expects_continue(head.headers):
                await self._send(CONTINUE_RESPONSE)
            while not complete:
                with trio.move_on_after(self._limits.body_read_timeout):
                    data = await self.stream.receive_some()
                    if not data:
                        raise _ClientClosed
                    piece = decoder.feed(bytes(data))
                    size += len(piece)
                    if size > self._limits.max_body_bytes:
                        raise RequestRejected("request body too large", status_hint=413, head=head)
                    pieces.append(piece)
                    complete = decoder.done
                    continue
                raise RequestRejected("request body not received in time", status_hint=408, head=head)
        except HTTPFramingError as exc:
            raise RequestRejected(
                f"malformed request body: {exc.message}", status_hint=400, head=head
            ) from None
        return b"".join(pieces)

    async def _respond(
        self, request: ClientRequest, head: RequestHead, decoder: BodyDecoder, *, keep_alive: bool
    ) -> bool:
        """Run the handler (and a disconnect watcher if it asks for one); True if the connection may serve
        another request."""
        sink = ResponseSink(
            self.stream,
            send_timeout=self._limits.send_timeout,
            disconnected=request.disconnected,
            close_connection=lambda: self._server.draining,
            head_request=request.method == "HEAD",
            http11=head.http_version == "1.1",
            client_keep_alive=keep_alive,
        )
        failure: Exception | None = None
        handler_scope = trio.CancelScope()
        watch = _DisconnectWatch(self, handler_scope, request.disconnected)
        request.watch_disconnect = watch.start
        self._server._active_requests += 1
        try:
            with handler_scope:
                try:
                    await self._server._handler(request, sink)
                except ClientGoneError:
                    pass
                except Exception as exc:
                    failure = exc
            await watch.stop()
        finally:
            self._server._active_requests -= 1
        if failure is not None:
            _log_handler_failure(request, failure)
        if request.disconnected.is_set() or handler_scope.cancelled_caught:
            return False
        if not sink.settled:
            if failure is None:
                logger.error("handler returned without finishing %s %s", request.method, request.path)
            if sink.started:
                await sink.abort()
            else:
                await self._reject(500, "internal error", head)
            return False
        if failure is not None or not sink.keeps_alive or self._server.draining:
            return False
        self._leftover = decoder.trailing + bytes(watch.kept)
        return True

    async def _watch_client(
        self, handler_scope: trio.CancelScope, disconnected: trio.Event, kept: bytearray
    ) -> None:
        """Read the socket while the handler runs: EOF or a reset means the client left. Bytes of a pipelined
        request are kept for the next cycle, up to one head's worth; beyond that the kernel buffers them."""
        while len(kept) < self._limits.max_header_bytes:
            try:
                data = await self.stream.receive_some()
            except BrokenStream:
                data = b""
            if not data:
                disconnected.set()
                handler_scope.cancel()
                return
            kept += data
        await trio.sleep_forever()

    async def _reject(self, status: int, message: str, head: RequestHead | None) -> None:
        """Answer a refused request with ``connection: close``, then close gracefully."""
        try:
            headers, body = self._server._rejector(status, message, head, self._peer_ip)
            payload = _serialize_rejection(status, headers, body)
        except Exception:
            logger.exception("the rejector failed; answering with a bare error")
            payload = _serialize_rejection(
                status, [(b"content-type", b"application/json")], _bare_error(status)
            )
        try:
            await self._send(payload)
            await self.stream.send_eof()
        except (*BrokenStream, ClientGoneError):
            return
        with trio.move_on_after(_LINGER_SECONDS):
            discarded = 0
            while discarded < _LINGER_BYTES:
                try:
                    data = await self.stream.receive_some()
                except BrokenStream:
                    return
                if not data:
                    return
                discarded += len(data)

    async def _send(self, payload: bytes) -> None:
        with trio.move_on_after(self._limits.send_timeout):
            await self.stream.send_all(payload)
            return
        raise ClientGoneError("the client stopped reading")


def _serialize_rejection(status: int, headers: Headers, body: bytes) -> bytes:
    """A complete response with ``connection: close`` (the rejector's headers are checked: it may echo a
    dialect's values, and a broken one must not inject a header)."""
    kept = [(name, value) for name, value in headers if name.lower() not in FRAMING_HEADERS]
    kept += [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    check_header_values(kept)
    return serialize_response_head(status, reason_phrase(status), kept) + body


def _expects_continue(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


def _bare_error(status: int) -> bytes:
    return json.dumps(
        {"error": {"message": reason_phrase(status).decode(), "type": "gateway_error"}}
    ).encode()


def _log_handler_failure(request: ClientRequest, exc: Exception) -> None:
    # Our own errors never carry secrets; a library's message might (a URL with ?key=), so only its type.
    if isinstance(exc, TrioProxyError):
        what = f"{type(exc).__name__}: {exc.message}"
    elif isinstance(exc, ExceptionGroup):
        leaves = ", ".join(sorted({type(leaf).__name__ for leaf in exc.exceptions}))
        what = f"{type(exc).__name__}[{leaves}]"
    else:
        what = type(exc).__name__
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("handler failed on %s %s: %s\n%s", request.method, request.path, what, stack)


# Listen backlog for SO_REUSEPORT listeners: trio's own default (the kernel caps it at net.core.somaxconn).
_REUSE_PORT_BACKLOG = 0xFFFF


async def _open_reuse_port_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """What ``trio.open_tcp_listeners`` does, plus ``SO_REUSEPORT`` before ``bind`` (which trio cannot set)."""
    addresses = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _name, address in addresses:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(_REUSE_PORT_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
