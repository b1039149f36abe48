"""A scriptable fake of the OpenAI, Anthropic and Gemini HTTP APIs, for end-to-end tests and benchmarks.

:class:`FakeUpstream` is a small HTTP/1.1 server on h11 + trio (keep-alive, one task per connection) that
answers the providers' routes with the exact bodies and stream events of
:mod:`trioproxy.testing.fake_payloads`, checks the providers' auth headers, records every request in
:attr:`FakeUpstream.captured`, and misbehaves on demand: :meth:`FakeUpstream.add_fault` arms a :class:`Fault`
(error status, delays, a dead, reset or stalled stream, an in-band error, a close-delimited body) for the next
matching requests.

Which provider a request speaks is read from its path and auth header: ``/v1beta/...`` and
``/v1/models/x:action`` are Gemini, ``/v1/messages...`` is Anthropic, ``GET /v1/models`` belongs to whoever's
auth header it carries (``x-goog-api-key`` or ``?key=`` Gemini, ``x-api-key`` or ``anthropic-version``
Anthropic, else OpenAI), and everything else is OpenAI. Anthropic takes its key from ``x-api-key`` or, as the
anthropic SDK 2.x sends it, ``Authorization: Bearer``.

Resource handling: ``serve`` owns its listener and a nursery with one task per connection; cancelling it
closes every socket (each close under a bounded shield), so ``open_connections`` drops back to 0. A response
with a delay or a stall also watches its client: when the client leaves, the response stops and the socket is
closed, as a provider stops generating for a dropped connection.

Error handling: a peer that vanishes ends its connection quietly; malformed HTTP gets a 400 and a close. Bugs
in the fake itself propagate and fail the test that runs it.

Run it alone for benchmarks: ``python -m trioproxy.testing.fake_upstream --port 18000 --events 5``.

The router (dialect, key, route, reply) is :mod:`trioproxy.testing.fake_router`; the wire formats live in
:mod:`trioproxy.testing.fake_payloads` and the per-provider modules beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qs, unquote

import h11
import trio

from trioproxy.testing.fake_payloads import (
    Call,
    Dialect,
    FakeUsage,
    Reply,
    answer_pieces,
    error_reply,
    not_found_reply,
    reason_phrase,
    response_headers,
    static_headers,
    unauthorized_reply,
)
from trioproxy.testing.fake_router import (
    CapturedRequest,
    build_reply,
    dialect_of,
    header_map,
    presented_key,
    route_of,
)

__all__ = ["CapturedRequest", "FakeUpstream", "FakeUsage", "Fault", "main"]

RECEIVE_SIZE = 65536
MAX_HEAD_SIZE = 64 * 1024  # h11's default is 16 KiB; providers accept far larger heads than any client sends
MAX_BODY_SIZE = 32 * 1024 * 1024  # OpenAI's documented request cap is 32 MB (Anthropic's too, for Messages)
DEFAULT_IDLE_TIMEOUT = 120.0  # keep-alive idle limit; also bounds a stall, so every wait has a deadline
CLOSE_GRACE = 1.0  # shielded seconds to close a socket (TLS close_notify) once we are cancelled


@dataclass
class Fault:
    """What to do to the next matching request(s); see the module docstring.

    ``die_after_events`` / ``stall_after_events`` count stream events (a plain body counts as one event, so 0
    acts right after the response head). A count at or past the end still withholds the terminating chunk.
    ``inband_error`` applies to streamed requests only.
    """

    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    first_byte_delay: float = 0.0
    chunk_delay: float | None = None
    die_after_events: int | None = None
    reset: bool = False
    stall_after_events: int | None = None
    inband_error: bool = False
    close_delimited: bool = False
    times: int = 1

    def __post_init__(self) -> None:
        if self.times < 1:
            raise ValueError("a fault applies to at least one request")
        if self.first_byte_delay < 0 or (self.chunk_delay is not None and self.chunk_delay < 0):
            raise ValueError("delays must be >= 0")
        if self.reset and self.die_after_events is None:
            raise ValueError("reset needs die_after_events")
        if self.die_after_events is not None and self.stall_after_events is not None:
            raise ValueError("a stream either dies or stalls, not both")
        if min(self.die_after_events or 0, self.stall_after_events or 0) < 0:
            raise ValueError("event counts must be >= 0")


@dataclass
class _ArmedFault:
    fault: Fault
    path_contains: str | None
    remaining: int  # < 0: applies forever
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class _Pacing:
    """How one response is sent: the fault's timing and breakage, with the server's default chunk delay."""

    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    die_after: int | None = None
    reset: bool = False
    stall_after: int | None = None
    close_delimited: bool = False
    keep_alive: bool = True  # the client allows another request on this connection
    chunked_ok: bool = True  # the client speaks HTTP/1.1 (an HTTP/1.0 client gets streams close-delimited)

    @classmethod
    def of(
        cls, fault: Fault | None, default_chunk_delay: float, *, keep_alive: bool, chunked_ok: bool
    ) -> _Pacing:
        if fault is None:
            return cls(chunk_delay=default_chunk_delay, keep_alive=keep_alive, chunked_ok=chunked_ok)
        return cls(
            first_byte_delay=fault.first_byte_delay,
            chunk_delay=default_chunk_delay if fault.chunk_delay is None else fault.chunk_delay,
            die_after=fault.die_after_events,
            reset=fault.reset,
            stall_after=fault.stall_after_events,
            close_delimited=fault.close_delimited,
            keep_alive=keep_alive,
            chunked_ok=chunked_ok,
        )

    def waits(self, frame_count: int) -> bool:
        """Whether sending sleeps at some point (then the client is watched meanwhile)."""
        return (
            self.first_byte_delay > 0
            or self.stall_after is not None
            or (frame_count > 1 and self.chunk_delay > 0)
        )


class _RequestTooLarge(Exception):
    def __init__(self, head: h11.Request) -> None:
        super().__init__("request body too large")
        self.head = head


class _Link:
    """A connection's stream and whether we already closed it (abruptly or not)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.closed = False
        self.peer_gone = False

    def socket_stream(self) -> trio.SocketStream:
        inner: trio.abc.Stream = self.stream
        if isinstance(inner, trio.SSLStream):
            inner = inner.transport_stream
        assert isinstance(inner, trio.SocketStream)
        return inner

    async def die(self, *, reset: bool) -> None:
        """Close the TCP socket under any TLS layer: FIN, or RST when ``reset`` (SO_LINGER with 0 timeout)."""
        sock = self.socket_stream()
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed = True
        await sock.aclose()

    async def close(self) -> None:
        self.closed = True
        with (
            trio.move_on_after(CLOSE_GRACE, shield=True),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.stream.aclose()


class FakeUpstream:
    """The fake provider: construct, arm faults if needed, then ``port = await nursery.start(fake.serve)``."""

    def __init__(
        self,
        *,
        accepted_keys: Iterable[str] = ("sk-upstream-test",),
        events: int = 5,
        chunk_delay: float = 0.0,
        usage: FakeUsage = FakeUsage(),  # noqa: B008 - frozen, so one shared default is safe
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_body_size: int = MAX_BODY_SIZE,
    ) -> None:
        self.accepted_keys = frozenset(accepted_keys)
        self.pieces = answer_pieces(events)
        self.events = events
        self.chunk_delay = chunk_delay
        self.usage = usage
        self.idle_timeout = idle_timeout
        self.max_body_size = max_body_size
        self.captured: list[CapturedRequest] = []
        self.open_connections = 0
        self.closed_connections = 0
        self._faults: list[_ArmedFault] = []
        self._seq = 0
        self._connections_changed = trio.Event()
        self._date = (0, "")  # (unix second, its HTTP date): formatting a date per response is wasted work
        self._static_headers = {  # each provider's fixed header lines, rendered once
            dialect: "".join(f"{name}: {value}\r\n" for name, value in static_headers(dialect)).encode(
                "latin-1"
            )
            for dialect in Dialect
        }

    def __repr__(self) -> str:
        return (
            f"<FakeUpstream open={self.open_connections} closed={self.closed_connections} "
            f"captured={len(self.captured)} faults={len(self._faults)}>"
        )

    @property
    def text(self) -> str:
        """The answer every generation route returns."""
        return "".join(self.pieces)

    async def wait_for_open_connections(self, count: int) -> None:
        """Return once exactly ``count`` connections are open; the caller puts a deadline around it."""
        while self.open_connections != count:
            await self._connections_changed.wait()

    def _count_connection(self, delta: int) -> None:
        self.open_connections += delta
        if delta < 0:
            self.closed_connections -= delta
        self._connections_changed.set()
        self._connections_changed = trio.Event()

    def add_fault(
        self,
        fault: Fault,
        *,
        path_contains: str | None = None,
        api_key: str | None = None,
        forever: bool = False,
    ) -> None:
        """Apply ``fault`` to the next ``fault.times`` authenticated requests to a known route whose path
        contains ``path_contains`` (any path if None) and that present ``api_key`` (any key if None), or to every
        such request with ``forever``. Faults are consumed in the order they were added."""
        self._faults.append(_ArmedFault(fault, path_contains, -1 if forever else fault.times, api_key))

    def clear_faults(self) -> None:
        """Disarm every fault not yet consumed."""
        self._faults.clear()

    def _take_fault(self, path: str, api_key: str) -> Fault | None:
        for armed in self._faults:
            if armed.path_contains is not None and armed.path_contains not in path:
                continue
            if armed.api_key is not None and armed.api_key != api_key:
                continue
            if armed.remaining > 0:
                armed.remaining -= 1
                if armed.remaining == 0:
                    self._faults.remove(armed)
            return armed.fault
        return None

    # ------------------------------------------------------------------------------------------- serving

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 picks a free port, reported through ``task_status.started``) until
        cancelled. With ``ssl_context`` it speaks HTTPS."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            if ssl_context is None:
                await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            else:
                tls = [trio.SSLListener(listener, ssl_context) for listener in listeners]
                await nursery.start(trio.serve_listeners, self._handle_connection, tls)
            task_status.started(bound_port)

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        self._count_connection(+1)
        link = _Link(stream)
        try:
            await self._converse(link)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away or broke TLS mid-send (maybe inside the watcher's nursery)
        finally:
            if not link.closed:
                await link.close()
            self._count_connection(-1)

    async def _converse(self, link: _Link) -> None:
        # h11 parses requests; responses are written by hand (their headers are ours and known to be valid,
        # and h11's per-header validation was most of the fake's CPU). Each request gets a fresh h11
        # connection fed with whatever the client already sent after the previous one.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        while True:
            try:
                request = await self._read_request(link, conn)
            except h11.RemoteProtocolError as exc:
                body = f"{exc}\n".encode()
                status = exc.error_status_hint
                head = f"HTTP/1.1 {status} {reason_phrase(status)}\r\ncontent-type: text/plain\r\n"
                head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
                await link.stream.send_all(head.encode() + body)
                return
            except _RequestTooLarge as exc:
                path = exc.head.target.decode("latin-1").partition("?")[0]
                dialect = dialect_of(path, header_map(exc.head.headers), {})
                reply = error_reply(dialect, 413, "Request exceeds the maximum allowed size.")
                await self._respond(link, conn, dialect, reply, None, self._next_seq(), keep_alive=False)
                return
            if request is None or link.peer_gone:
                return
            self.captured.append(request)
            http11 = request.http_version == "1.1"
            connection = (request.header("connection") or "").lower()
            keep_alive = http11 and "close" not in connection
            dialect, reply, fault, seq = self._answer(request)
            if not await self._respond(
                link, conn, dialect, reply, fault, seq, keep_alive=keep_alive, http11=http11
            ):
                return
            pipelined, closed = conn.trailing_data
            if closed:
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
            if pipelined:
                conn.receive_data(pipelined)

    async def _read_request(self, link: _Link, conn: h11.Connection) -> CapturedRequest | None:
        """The next complete request; None when the client closed or stayed idle past ``idle_timeout``."""
        head: h11.Request | None = None
        received_at = 0.0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await link.stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                data = b""
                with trio.move_on_after(self.idle_timeout):
                    data = bytes(await link.stream.receive_some(RECEIVE_SIZE))
                if not data and head is None:
                    return None  # idle timeout or EOF between requests
                conn.receive_data(data)  # b"" is EOF: h11 turns a truncated request into RemoteProtocolError
                continue
            if isinstance(event, h11.Request):
                head = event
                received_at = trio.current_time()
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_size:
                    assert head is not None
                    raise _RequestTooLarge(head)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers]
                method = head.method.decode("ascii")
                version = head.http_version.decode("ascii")
                return CapturedRequest(
                    method, target, path, query, headers, bytes(body), received_at, version
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------------------------------- answering

    def _answer(self, request: CapturedRequest) -> tuple[Dialect, Reply, Fault | None, int]:
        """Pick the dialect, check auth, route, consume a fault, and build the reply (all synchronous)."""
        seq = self._next_seq()
        headers: dict[str, str] = {}
        for name, value in request.headers:
            headers.setdefault(name, value)
        params = parse_qs(request.query, keep_blank_values=True)
        path = unquote(request.path)
        dialect = dialect_of(path, headers, params)
        key = presented_key(dialect, headers, params)
        if key is None or key not in self.accepted_keys:
            return dialect, unauthorized_reply(dialect, key_present=key is not None, seq=seq), None, seq
        if dialect is Dialect.ANTHROPIC and "anthropic-version" not in headers:
            return (
                dialect,
                error_reply(dialect, 400, "anthropic-version: header is required", seq=seq),
                None,
                seq,
            )
        route = route_of(dialect, request.method, path)
        if route is None:
            return dialect, not_found_reply(dialect, request.method, request.path, seq=seq), None, seq
        fault = self._take_fault(request.path, key)
        if fault is not None and fault.status is not None:
            return dialect, error_reply(dialect, fault.status, seq=seq), fault, seq
        call = Call(seq=seq, now=int(time.time()), pieces=self.pieces, usage=self.usage)
        return dialect, build_reply(dialect, route, request, params, call), fault, seq

    async def _respond(
        self,
        link: _Link,
        conn: h11.Connection,
        dialect: Dialect,
        reply: Reply,
        fault: Fault | None,
        seq: int,
        *,
        keep_alive: bool,
        http11: bool = True,
    ) -> bool:
        """Send ``reply`` as ``fault`` says; True when the connection may carry another request."""
        streamed = reply.frames is not None
        frames = reply.frames if reply.frames is not None else [reply.body]
        if fault is not None and fault.inband_error and streamed and reply.inband_error:
            frames = reply.inband_error
        head = self._head_lines(dialect, seq, reply)
        if not keep_alive:
            head += b"connection: close\r\n"
        if fault is None and not streamed:  # the hot path: one send for the whole response
            head += b"content-length: %d\r\n\r\n" % len(reply.body)
            await link.stream.send_all(head + reply.body)
            return keep_alive
        pacing = _Pacing.of(fault, self.chunk_delay, keep_alive=keep_alive, chunked_ok=http11)
        if fault is not None:
            head += "".join(f"{name}: {value}\r\n" for name, value in fault.headers).encode("latin-1")
        if not pacing.waits(len(frames)):
            return await self._send(link, head, frames, streamed, pacing)
        keep = False  # stays False when the watcher cancels the send because the client left
        async with trio.open_nursery() as nursery:
            # The response waits (delay or stall), so watch the client: if it leaves, stop and close.
            nursery.start_soon(self._watch_peer, link, conn, nursery.cancel_scope)
            keep = await self._send(link, head, frames, streamed, pacing)
            nursery.cancel_scope.cancel()
        return keep and not link.peer_gone

    def _head_lines(self, dialect: Dialect, seq: int, reply: Reply) -> bytes:
        """Status line and headers, without framing or the blank line."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        dynamic = "".join(f"{name}: {value}\r\n" for name, value in response_headers(dialect, seq))
        return b"".join(
            (
                f"HTTP/1.1 {reply.status} {reason_phrase(reply.status)}\r\n".encode(),
                f"date: {self._date[1]}\r\ncontent-type: {reply.content_type}\r\n".encode(),
                self._static_headers[dialect],
                dynamic.encode("latin-1"),
            )
        )

    async def _watch_peer(self, link: _Link, conn: h11.Connection, scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await link.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                link.peer_gone = True
                scope.cancel()
                return
            conn.receive_data(bytes(data))  # a pipelined next request: kept for the next cycle

    async def _send(
        self, link: _Link, head: bytes, frames: list[bytes], streamed: bool, pacing: _Pacing
    ) -> bool:
        die_after, stall_after = pacing.die_after, pacing.stall_after
        # Close-delimited when asked to, or for a stream to an HTTP/1.0 client (which cannot take chunks).
        raw = pacing.close_delimited or (streamed and not pacing.chunked_ok)
        if pacing.first_byte_delay > 0:
            await trio.sleep(pacing.first_byte_delay)
        if raw:
            framing = b"" if b"connection: close\r\n" in head else b"connection: close\r\n"
        elif streamed:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b"content-length: %d\r\n" % len(frames[0])
        await link.stream.send_all(head + framing + b"\r\n")
        for index, frame in enumerate(frames):
            if index in (die_after, stall_after):
                break
            if index and pacing.chunk_delay > 0:
                await trio.sleep(pacing.chunk_delay)
            await link.stream.send_all(
                b"%x\r\n%s\r\n" % (len(frame), frame) if streamed and not raw else frame
            )
        if die_after is not None:
            await link.die(reset=pacing.reset)
            return False
        if stall_after is not None:
            await trio.sleep(self.idle_timeout)  # silent but open, until the client gives up or we time out
            return False
        if raw:
            await link.close()  # the close is the end of the body
            return False
        if streamed:
            await link.stream.send_all(b"0\r\n\r\n")
        return pacing.keep_alive


# ----------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trioproxy.testing.fake_upstream",
        description="Serve a fake OpenAI/Anthropic/Gemini upstream for benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--events", type=int, default=5, help="content events per streamed answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream events")
    parser.add_argument(
        "--key",
        action="append",
        dest="keys",
        help="an accepted provider key (repeatable; default sk-upstream-test)",
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    fake = FakeUpstream(
        accepted_keys=args.keys or ("sk-upstream-test",), events=args.events, chunk_delay=args.chunk_delay
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(fake.serve, args.host, args.port))
        print(f"fake upstream listening on http://{args.host}:{port}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m trioproxy.testing.fake_upstream``; runs until interrupted."""
    args = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run, args)


if __name__ == "__main__":
    main()
