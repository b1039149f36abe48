"""The connection pool against a tiny h11 server on 127.0.0.1, and a state machine over its books."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing
import trustme
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.examples import examples
from trioproxy.errors import (
    PoolClosedError,
    UpstreamConnectError,
    UpstreamDiedError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from trioproxy.pool import (
    HOUSEKEEPING_INTERVAL,
    ConnectionPool,
    ExchangeTimeouts,
    PoolBooks,
    Step,
    Ticket,
    UpstreamRequest,
    UpstreamResponse,
)
from trioproxy.snapshot import Origin
from trioproxy.upstream_conn import SLOW_WAIT

TIMEOUTS = ExchangeTimeouts(connect=5.0, first_byte=5.0, idle=5.0)


# -- a tiny upstream server --


class ServerConn:
    """The server side of one accepted connection."""

    def __init__(self, index: int, stream: trio.abc.Stream) -> None:
        self.index = index
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.saw_eof = trio.Event()
        self.closed = trio.Event()  # the server closed its end
        self.alpn: str | None = None

    async def _recv(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.saw_eof.set()
        return bytes(data)

    async def read_request(self) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._recv())
                if isinstance(self.stream, trio.SSLStream) and self.alpn is None:
                    self.alpn = self.stream.selected_alpn_protocol()
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                self.requests.append((request, bytes(body)))
                return request, bytes(body)
            else:
                return None  # ConnectionClosed

    async def wait_eof(self) -> None:
        while await self._recv():
            pass

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.h11.send(e) or b"" for e in events))

    async def respond(self, body: bytes = b"ok", headers: tuple[tuple[str, str], ...] = ()) -> None:
        head = [("content-length", str(len(body))), ("x-conn", str(self.index)), *headers]
        await self.send(h11.Response(status_code=200, headers=head), h11.Data(data=body), h11.EndOfMessage())


Responder = Callable[[ServerConn, h11.Request, bytes], Awaitable[bool]]


async def routes(conn: ServerConn, request: h11.Request, body: bytes) -> bool:
    """Behaviour by request target; returns False to close the connection."""
    target = bytes(request.target).partition(b"?")[0]
    if target == b"/hello":
        await conn.respond(b"hello")
    elif target == b"/echo":
        await conn.respond(body)
    elif target == b"/close-after":
        await conn.respond(b"bye")
        return False  # closes silently, without Connection: close
    elif target == b"/drop":
        return False
    elif target == b"/drop-second":
        if len(conn.requests) >= 2:
            return False
        await conn.respond(b"first")
    elif target == b"/no-answer":
        await conn.wait_eof()  # reads on, answers never
        return False
    elif target == b"/stall-body":
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await conn.send(head, h11.Data(data=b"a"))
        await conn.wait_eof()
        return False
    elif target == b"/truncated-chunked":
        await conn.stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return False
    elif target == b"/truncated-length":
        await conn.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
        return False
    elif target == b"/conn-close":
        # Says close but keeps the socket open: only the client's own logic can close it.
        await conn.stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await conn.wait_eof()
        return False
    elif target == b"/http10":
        await conn.stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nclose-delimited body")
        return False
    elif target == b"/informational":
        await conn.send(h11.InformationalResponse(status_code=103, headers=[("link", "</style.css>")]))
        await conn.respond(b"final")
    elif target == b"/huge-head":
        await conn.respond(b"x", headers=(("x-big", "v" * (20 * 1024)),))
    elif target == b"/trailing-garbage":
        await conn.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA")
        await conn.wait_eof()
        return False
    elif target == b"/garbage":
        await conn.stream.send_all(b"SURPRISE\r\n\r\n")
        await conn.wait_eof()
        return False
    else:
        raise AssertionError(f"unknown target {target!r}")
    return True


class UpstreamStub:
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.conns: list[ServerConn] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = ServerConn(len(self.conns), stream)
        self.conns.append(conn)
        try:
            while True:
                got = await conn.read_request()
                if got is None or not await self.responder(conn, *got):
                    break
                conn.h11.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            conn.closed.set()


@asynccontextmanager
async def running_stub(
    responder: Responder = routes, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[UpstreamStub, Origin]]:
    stub = UpstreamStub(responder)
    async with trio.open_nursery() as nursery:
        if tls is None:
            listeners = await nursery.start(partial(trio.serve_tcp, stub.handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
        else:
            serve = partial(
                trio.serve_ssl_over_tcp, stub.handle, 0, tls, host="127.0.0.1", https_compatible=True
            )
            listeners = await nursery.start(serve)
            port = listeners[0].transport_listener.socket.getsockname()[1]
        yield stub, Origin("https" if tls else "http", "127.0.0.1", port)
        nursery.cancel_scope.cancel()


def loopback_only(ip: str) -> bool:
    return ip == "127.0.0.1"


@asynccontextmanager
async def open_pool(
    *,
    cap: int = 10,
    idle_expiry: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
    address_allowed: Callable[[str], bool] = loopback_only,
    max_head: int = 16 * 1024,
) -> AsyncIterator[ConnectionPool]:
    pool = ConnectionPool(
        max_connections_per_origin=cap,
        idle_expiry=idle_expiry,
        ssl_context=ssl_context or ssl.create_default_context(),
        address_allowed=address_allowed,
        max_response_header_bytes=max_head,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


def make_request(origin: Origin, target: bytes, body: bytes = b"", extra=()) -> UpstreamRequest:
    headers = [(b"host", origin.host_header.encode()), (b"content-length", str(len(body)).encode()), *extra]
    return UpstreamRequest(b"POST" if body else b"GET", target, headers, body)


async def read_all(response: UpstreamResponse) -> bytes:
    chunks = []
    while data := await response.receive_some():
        chunks.append(data)
    return b"".join(chunks)


async def fetch(
    pool: ConnectionPool,
    origin: Origin,
    target: bytes,
    timeouts: ExchangeTimeouts = TIMEOUTS,
    body: bytes = b"",
) -> tuple[UpstreamResponse, bytes]:
    async with pool.exchange(origin, make_request(origin, target, body), timeouts) as response:
        return response, await read_all(response)


def header(response: UpstreamResponse, name: bytes) -> bytes | None:
    return next((v for n, v in response.headers if n == name), None)


# -- reuse --


async def test_sequential_requests_reuse_one_connection() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        for body in (b"one", b"two", b"three"):
            response, data = await fetch(pool, origin, b"/echo", body=body)
            assert (response.status, data, response.complete) == (200, body, True)
            assert response.http_version == b"1.1"
            assert response.reason == b""
        assert len(stub.conns) == 1
        assert [b for _, b in stub.conns[0].requests] == [b"one", b"two", b"three"]
        stats = pool.stats()
        assert (stats.opened, stats.reused, stats.idle, stats.in_use) == (1, 2, 1, 0)
        assert repr(pool) == (
            "<ConnectionPool [OPEN, origins: 1, idle: 1, in use: 0, connecting: 0, waiting: 0]>"
        )


async def test_request_is_sent_as_given() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        request = make_request(origin, b"/echo?x=1", b"payload", extra=[(b"Authorization", b"Bearer sk-1")])
        async with pool.exchange(origin, request, TIMEOUTS) as response:
            assert await read_all(response) == b"payload"
        seen, _ = stub.conns[0].requests[0]
        assert seen.method == b"POST"
        assert seen.target == b"/echo?x=1"
        assert (b"authorization", b"Bearer sk-1") in list(seen.headers)


async def test_reuse_is_lifo() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        got: dict[str, bytes] = {}
        finish = {"a": trio.Event(), "b": trio.Event()}
        done = {"a": trio.Event(), "b": trio.Event()}
        holding = {"a": trio.Event(), "b": trio.Event()}

        async def hold(name: str) -> None:
            async with pool.exchange(origin, make_request(origin, b"/hello"), TIMEOUTS) as response:
                await read_all(response)
                got[name] = header(response, b"x-conn") or b""
                holding[name].set()
                await finish[name].wait()
            done[name].set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "a")
            await holding["a"].wait()
            nursery.start_soon(hold, "b")
            await holding["b"].wait()
            assert got["a"] != got["b"]
            finish["a"].set()
            await done["a"].wait()
            finish["b"].set()
            await done["b"].wait()
        assert pool.stats().idle == 2
        response, _ = await fetch(pool, origin, b"/hello")
        assert header(response, b"x-conn") == got["b"]  # the most recently released one
        response, _ = await fetch(pool, origin, b"/hello")
        assert header(response, b"x-conn") == got["b"]  # and again, while "a" ages
        assert len(stub.conns) == 2


async def test_cap_makes_requests_wait_and_hands_over_the_connection() -> None:
    async with running_stub() as (stub, origin), open_pool(cap=1) as pool:
        release = trio.Event()
        seen: list[bytes] = []

        async def first() -> None:
            async with pool.exchange(origin, make_request(origin, b"/hello"), TIMEOUTS) as response:
                await read_all(response)
                await release.wait()

        async def second() -> None:
            response, data = await fetch(pool, origin, b"/hello")
            seen.append(data)
            seen.append(header(response, b"x-conn") or b"")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.stats()
            assert (stats.in_use, stats.waiting, stats.opened) == (1, 1, 1)
            release.set()
        assert seen == [b"hello", b"0"]
        assert len(stub.conns) == 1


async def test_pool_full_times_out_after_the_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with running_stub() as (_, origin), open_pool(cap=1) as pool:
        release = trio.Event()
        holding = trio.Event()

        async def hog() -> None:
            async with pool.exchange(origin, make_request(origin, b"/hello"), TIMEOUTS) as response:
                await read_all(response)
                holding.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            await holding.wait()
            start = trio.current_time()
            with pytest.raises(UpstreamTimeoutError, match="pool full"):
                await fetch(pool, origin, b"/hello", ExchangeTimeouts(connect=3.0, first_byte=9.0, idle=9.0))
            assert trio.current_time() - start == 3.0
            assert pool.stats().waiting == 0
            release.set()
        response, _ = await fetch(pool, origin, b"/hello")
        assert response.status == 200


# -- expiry and dead idle connections --


async def test_idle_connections_expire(autojump_clock: trio.testing.MockClock) -> None:
    async with running_stub() as (stub, origin), open_pool(idle_expiry=10.0) as pool:
        await fetch(pool, origin, b"/hello")
        released = trio.current_time()
        await trio.sleep(9.0)
        assert pool.stats().idle == 1
        assert not stub.conns[0].saw_eof.is_set()
        with trio.fail_after(10.0 + HOUSEKEEPING_INTERVAL):
            await stub.conns[0].saw_eof.wait()
        assert 10.0 <= trio.current_time() - released <= 10.0 + HOUSEKEEPING_INTERVAL
        assert pool.stats().idle == 0
        assert pool.stats().origins == 0


async def test_expired_connection_is_not_reused_even_without_housekeeping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_stub() as (stub, origin):
        pool = ConnectionPool(
            max_connections_per_origin=2,
            idle_expiry=10.0,
            ssl_context=ssl.create_default_context(),
            address_allowed=loopback_only,
        )
        async with trio.open_nursery() as nursery:
            await fetch(pool, origin, b"/hello")
            await trio.sleep(10.0)
            await fetch(pool, origin, b"/hello")  # housekeeping is not running: checkout expires it
            assert len(stub.conns) == 2
            with trio.fail_after(1):
                await stub.conns[0].saw_eof.wait()
            nursery.start_soon(pool.run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert pool.closed


async def test_peer_closed_idle_connection_is_discarded() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        await fetch(pool, origin, b"/close-after")
        with trio.fail_after(5):
            await stub.conns[0].closed.wait()
        await trio.sleep(0.01)  # let the FIN land in our socket's receive queue
        response, data = await fetch(pool, origin, b"/hello")
        assert data == b"hello"
        assert header(response, b"x-conn") == b"1"
        stats = pool.stats()
        assert (stats.opened, stats.reused, stats.stale_retries) == (2, 0, 0)


async def test_housekeeping_drops_peer_closed_idle_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        await fetch(pool, origin, b"/close-after")
        with trio.fail_after(1):
            await stub.conns[0].closed.wait()
        assert pool.stats().idle == 1
        await trio.sleep(2 * HOUSEKEEPING_INTERVAL)  # at least one whole housekeeping pass
        assert pool.stats().idle == 0  # long before the idle expiry (60 s)


async def test_bytes_after_the_response_prevent_reuse() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        response, data = await fetch(pool, origin, b"/trailing-garbage")
        assert (data, response.complete) == (b"ok", True)
        assert pool.stats().idle == 0
        with trio.fail_after(5):
            await stub.conns[0].saw_eof.wait()


async def test_stale_connection_is_retried_once_on_a_fresh_connection() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        await fetch(pool, origin, b"/drop-second")
        # The provider drops the idle connection just as the next request arrives (keep-alive race).
        response, data = await fetch(pool, origin, b"/drop-second")
        assert data == b"first"
        assert header(response, b"x-conn") == b"1"
        assert len(stub.conns) == 2
        assert pool.stats().stale_retries == 1


async def test_fresh_connection_is_never_retried() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        with pytest.raises(UpstreamDiedError, match="before responding"):
            await fetch(pool, origin, b"/drop")
        assert len(stub.conns) == 1
        assert pool.stats().stale_retries == 0


async def test_stale_retry_happens_only_once() -> None:
    async def first_answer_then_drop(conn: ServerConn, request: h11.Request, body: bytes) -> bool:
        if conn.index == 0 and len(conn.requests) == 1:
            await conn.respond(b"first")
            return True
        return False

    async with running_stub(first_answer_then_drop) as (stub, origin), open_pool() as pool:
        await fetch(pool, origin, b"/")
        with pytest.raises(UpstreamDiedError):
            await fetch(pool, origin, b"/")
        assert len(stub.conns) == 2
        assert pool.stats().stale_retries == 1
        assert pool.stats().idle == 0


async def reset(conn: ServerConn) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = conn.stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_reset_on_a_reused_connection_is_retried_and_on_a_fresh_one_is_died() -> None:
    async def answer_once_then_reset(conn: ServerConn, request: h11.Request, body: bytes) -> bool:
        if conn.index == 0 and len(conn.requests) == 1:
            await conn.respond(b"first")
            return True
        await reset(conn)
        return False

    async with running_stub(answer_once_then_reset) as (stub, origin), open_pool() as pool:
        await fetch(pool, origin, b"/")
        with pytest.raises(UpstreamDiedError, match="reset the connection before responding"):
            await fetch(pool, origin, b"/")  # reset on the reused one: retried; reset on the fresh one: died
        assert len(stub.conns) == 2
        assert pool.stats().stale_retries == 1


async def test_reset_mid_body_is_died_error() -> None:
    first_chunk_read = trio.Event()

    async def chunk_then_reset(conn: ServerConn, request: h11.Request, body: bytes) -> bool:
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await conn.send(head, h11.Data(data=b"a"))
        await first_chunk_read.wait()
        await reset(conn)
        return False

    async with running_stub(chunk_then_reset) as (_, origin), open_pool() as pool:

        async def read_past_the_reset() -> None:
            async with pool.exchange(origin, make_request(origin, b"/"), TIMEOUTS) as response:
                assert await response.receive_some() == b"a"
                first_chunk_read.set()
                await response.receive_some()

        with pytest.raises(UpstreamDiedError, match="reset the connection mid-body"):
            await read_past_the_reset()
        assert pool.stats().idle == 0


# -- timeouts --


async def test_connect_timeout_on_a_listener_that_never_accepts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:  # fill the accept queue; later SYNs are dropped
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            async with open_pool() as pool:
                start = trio.current_time()
                with pytest.raises(UpstreamConnectError, match="took longer than 2s") as caught:
                    await fetch(
                        pool, Origin("http", "127.0.0.1", port), b"/", ExchangeTimeouts(2.0, 9.0, 9.0)
                    )
                assert trio.current_time() - start == 2.0
                assert caught.value.status_hint == 504
                assert pool.stats().connecting == 0
        finally:
            for filler in fillers:
                filler.close()


async def test_connect_timeout_covers_the_tls_handshake(autojump_clock: trio.testing.MockClock) -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, mute, 0, host="127.0.0.1"))
        origin = Origin("https", "127.0.0.1", listeners[0].socket.getsockname()[1])
        async with open_pool() as pool:
            start = trio.current_time()
            with pytest.raises(UpstreamConnectError, match="took longer than 4s"):
                await fetch(pool, origin, b"/", ExchangeTimeouts(4.0, 9.0, 9.0))
            assert trio.current_time() - start == 4.0
        nursery.cancel_scope.cancel()


async def test_first_byte_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        start = trio.current_time()
        with pytest.raises(UpstreamTimeoutError, match="no response head within 7s"):
            await fetch(pool, origin, b"/no-answer", ExchangeTimeouts(1.0, 7.0, 1.0))
        assert trio.current_time() - start == 7.0
        with trio.fail_after(1):
            await stub.conns[0].saw_eof.wait()  # the timed-out connection was closed
        assert pool.stats().idle == 0


async def test_on_slow_runs_once_when_the_provider_keeps_us_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []
    async with running_stub() as (_, origin), open_pool() as pool:
        start = trio.current_time()
        with pytest.raises(UpstreamTimeoutError):
            async with pool.exchange(
                origin,
                make_request(origin, b"/no-answer"),
                ExchangeTimeouts(1.0, 7.0, 1.0),
                lambda: calls.append(trio.current_time() - start),
            ):
                pass
    assert calls == [pytest.approx(SLOW_WAIT)]


async def test_on_slow_runs_for_a_stalled_body_and_not_for_a_fast_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []
    async with running_stub() as (_, origin), open_pool() as pool:
        async with pool.exchange(
            origin, make_request(origin, b"/hello"), TIMEOUTS, lambda: calls.append("hello")
        ) as response:
            await read_all(response)
        assert calls == []
        timeouts = ExchangeTimeouts(connect=1.0, first_byte=1.0, idle=6.0)
        async with pool.exchange(
            origin, make_request(origin, b"/stall-body"), timeouts, lambda: calls.append("stall")
        ) as response:
            assert await response.receive_some() == b"a"
            with pytest.raises(UpstreamTimeoutError):
                await response.receive_some()
        assert calls == ["stall"]


async def test_first_byte_timeout_covers_a_provider_that_does_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never_read(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, never_read, 0, host="127.0.0.1"))
        origin = Origin("http", "127.0.0.1", listeners[0].socket.getsockname()[1])
        async with open_pool() as pool:
            start = trio.current_time()
            with pytest.raises(UpstreamTimeoutError, match="did not take the request within 8s"):
                # Far more than the socket buffers hold, so the send blocks.
                await fetch(
                    pool, origin, b"/", ExchangeTimeouts(1.0, 8.0, 1.0), body=b"x" * (64 * 1024 * 1024)
                )
            assert trio.current_time() - start == 8.0
        nursery.cancel_scope.cancel()


async def test_idle_timeout_between_body_chunks(autojump_clock: trio.testing.MockClock) -> None:
    async with running_stub() as (_, origin), open_pool() as pool:
        timeouts = ExchangeTimeouts(connect=1.0, first_byte=1.0, idle=6.0)
        async with pool.exchange(origin, make_request(origin, b"/stall-body"), timeouts) as response:
            assert await response.receive_some() == b"a"
            start = trio.current_time()
            with pytest.raises(UpstreamTimeoutError, match="nothing for 6s mid-body"):
                await response.receive_some()
            assert trio.current_time() - start == 6.0
            assert not response.complete
        assert pool.stats().idle == 0


# -- framing and protocol errors --


@pytest.mark.parametrize("target", [b"/truncated-chunked", b"/truncated-length"])
async def test_truncated_body_is_died_error_and_not_reused(target: bytes) -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:

        async def read_past_the_truncation() -> None:
            async with pool.exchange(origin, make_request(origin, target), TIMEOUTS) as response:
                assert await response.receive_some() == b"hello"
                await response.receive_some()

        with pytest.raises(UpstreamDiedError, match="mid-body"):
            await read_past_the_truncation()
        assert pool.stats().idle == 0
        await fetch(pool, origin, b"/hello")
        assert len(stub.conns) == 2
        assert pool.stats().reused == 0


async def test_connection_close_is_not_reused() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        response, data = await fetch(pool, origin, b"/conn-close")
        assert (data, response.complete) == (b"ok", True)
        assert pool.stats().idle == 0
        with trio.fail_after(5):
            await stub.conns[0].saw_eof.wait()  # we closed it although the server kept it open


async def test_close_delimited_body_is_complete_at_eof() -> None:
    async with running_stub() as (_, origin), open_pool() as pool:
        response, data = await fetch(pool, origin, b"/http10")
        assert (response.http_version, data, response.complete) == (b"1.0", b"close-delimited body", True)
        assert pool.stats().idle == 0


async def test_informational_responses_are_skipped_and_the_connection_reused() -> None:
    async with running_stub() as (stub, origin), open_pool() as pool:
        response, data = await fetch(pool, origin, b"/informational")
        assert (response.status, data) == (200, b"final")
        await fetch(pool, origin, b"/hello")
        assert len(stub.conns) == 1


async def test_oversized_response_head_is_a_protocol_error() -> None:
    async with running_stub() as (_, origin), open_pool(max_head=16 * 1024) as pool:
        with pytest.raises(UpstreamProtocolError, match="exceeds 16384 bytes"):
            await fetch(pool, origin, b"/huge-head")
        assert pool.stats().idle == 0


async def test_incomplete_oversized_head_is_a_protocol_error() -> None:
    async def endless_head(conn: ServerConn, request: h11.Request, body: bytes) -> bool:
        await conn.stream.send_all(b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"p" * 40_000)
        await conn.wait_eof()
        return False

    async with running_stub(endless_head) as (_, origin), open_pool(max_head=1024) as pool:
        with pytest.raises(UpstreamProtocolError, match="exceeds 1024 bytes"):
            await fetch(pool, origin, b"/")


async def test_garbage_response_is_a_protocol_error() -> None:
    async with running_stub() as (_, origin), open_pool() as pool:
        with pytest.raises(UpstreamProtocolError, match="malformed"):
            await fetch(pool, origin, b"/garbage")
        assert pool.stats().idle == 0


async def test_invalid_request_header_error_does_not_leak_the_value() -> None:
    async with running_stub() as (_, origin), open_pool() as pool:
        bad = make_request(origin, b"/hello", extra=[(b"authorization", b"Bearer sk-SECRET\r\nx: y")])
        with pytest.raises(UpstreamProtocolError) as caught:
            async with pool.exchange(origin, bad, TIMEOUTS):
                pass
        assert "sk-SECRET" not in str(caught.value)
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__
        assert "sk-SECRET" not in repr(bad)
        assert pool.stats().in_use == 0


# -- connecting --


async def test_refused_address_makes_no_connection() -> None:
    async with running_stub() as (stub, origin), open_pool(address_allowed=lambda ip: False) as pool:
        with pytest.raises(UpstreamConnectError, match="not allowed"):
            await fetch(pool, origin, b"/hello")
        await trio.testing.wait_all_tasks_blocked()
        assert stub.conns == []
        stats = pool.stats()
        assert (stats.opened, stats.connecting, stats.origins) == (0, 0, 0)


async def test_connection_refused_is_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connects are refused
        async with open_pool() as pool:
            with pytest.raises(UpstreamConnectError, match="cannot connect"):
                await fetch(pool, Origin("http", "127.0.0.1", port), b"/")
            assert pool.stats().connecting == 0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def test_tls_round_trip_with_reuse_and_alpn(ca: trustme.CA) -> None:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with running_stub(tls=server_context(ca)) as (stub, origin), open_pool(ssl_context=client) as pool:
        for body in (b"secret one", b"secret two"):
            response, data = await fetch(pool, origin, b"/echo", body=body)
            assert (response.status, data) == (200, body)
        assert len(stub.conns) == 1
        assert stub.conns[0].alpn == "http/1.1"


async def test_untrusted_certificate_is_connect_error(ca: trustme.CA) -> None:
    async with running_stub(tls=server_context(ca)) as (_, origin), open_pool() as pool:
        with pytest.raises(UpstreamConnectError, match=r"TLS handshake .* failed"):
            await fetch(pool, origin, b"/hello")
        assert pool.stats().connecting == 0


# -- shutdown --


async def test_shutdown_closes_idle_connections_and_refuses_new_requests() -> None:
    async with running_stub() as (stub, origin):
        pool = ConnectionPool(
            max_connections_per_origin=4,
            idle_expiry=60.0,
            ssl_context=ssl.create_default_context(),
            address_allowed=loopback_only,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await fetch(pool, origin, b"/hello")
            assert pool.stats().idle == 1
            nursery.cancel_scope.cancel()
        assert pool.closed
        assert repr(pool).startswith("<ConnectionPool [CLOSED")
        with trio.fail_after(5):
            await stub.conns[0].saw_eof.wait()
        with pytest.raises(PoolClosedError):
            await fetch(pool, origin, b"/hello")


async def test_shutdown_wakes_waiters_with_pool_closed() -> None:
    async with running_stub() as (_, origin):
        pool = ConnectionPool(
            max_connections_per_origin=1,
            idle_expiry=60.0,
            ssl_context=ssl.create_default_context(),
            address_allowed=loopback_only,
        )
        outcomes: list[str] = []
        async with trio.open_nursery() as requests:
            services = trio.CancelScope()

            async def run_pool(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with services:
                    await pool.run(task_status=task_status)

            await requests.start(run_pool)

            async def hog() -> None:
                async with pool.exchange(origin, make_request(origin, b"/hello"), TIMEOUTS) as response:
                    await read_all(response)
                    await trio.sleep_forever()

            async def wait_in_line() -> None:
                try:
                    await fetch(pool, origin, b"/hello")
                except PoolClosedError:
                    outcomes.append("pool closed")

            requests.start_soon(hog)
            await trio.testing.wait_all_tasks_blocked()
            requests.start_soon(wait_in_line)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.stats().waiting == 1
            services.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == ["pool closed"]
            requests.cancel_scope.cancel()
        assert pool.stats().in_use == 0


# -- the bookkeeping as a state machine --


class FakeConn:
    def __init__(self, origin: Origin, serial: int) -> None:
        self.origin = origin
        self.serial = serial
        self.expires_at: float | None = None
        self.peer_closed = False
        self.closed = False

    def is_idle(self) -> bool:
        return self.expires_at is not None

    def is_available(self) -> bool:
        return not self.closed and not self.peer_closed

    def has_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def mark_idle(self, expires_at: float) -> None:
        self.expires_at = expires_at

    def mark_in_use(self) -> None:
        self.expires_at = None

    def __repr__(self) -> str:
        return f"FakeConn({self.origin.host}, {self.serial})"


ORIGINS = [Origin("http", "a.example", 80), Origin("https", "b.example", 443)]
CAP = 2


def test_books_reuse_is_lifo_and_skips_peer_closed() -> None:
    books: PoolBooks[FakeConn] = PoolBooks(max_per_origin=3, idle_expiry=10.0)
    origin = ORIGINS[0]
    conns = []
    for serial in range(3):
        ticket, _ = books.acquire(origin, 0.0)
        assert ticket.may_connect
        conn = FakeConn(origin, serial)
        books.connected(origin, conn)
        conns.append(conn)
    for conn in conns:
        books.release(conn, 1.0, reusable=True)
    conns[2].peer_closed = True
    ticket, step = books.acquire(origin, 2.0)
    assert ticket.connection is conns[1]
    assert step.to_close == [conns[2]]
    assert books.idle_connections(origin) == [conns[0]]


class BooksMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.books: PoolBooks[FakeConn] = PoolBooks(max_per_origin=CAP, idle_expiry=10.0)
        self.now = 0.0
        self.serial = 0
        self.held: list[tuple[Ticket[FakeConn], FakeConn]] = []  # connections lent to exchanges
        self.slots: list[Ticket[FakeConn]] = []  # granted slots being connected
        self.waiting: list[Ticket[FakeConn]] = []
        self.closed: list[FakeConn] = []

    def apply(self, step: Step[FakeConn]) -> None:
        for conn in step.to_close:
            assert not conn.closed, f"{conn} closed twice"
            conn.closed = True
            self.closed.append(conn)
            self.held = [(t, c) for t, c in self.held if c is not conn]
        for ticket in step.woken:
            self.waiting.remove(ticket)
            self.file(ticket)

    def file(self, ticket: Ticket[FakeConn]) -> None:
        if ticket.connection is not None:
            self.held.append((ticket, ticket.connection))
        elif ticket.may_connect:
            self.slots.append(ticket)
        elif not ticket.pool_closed:
            self.waiting.append(ticket)

    @rule(origin=st.sampled_from(ORIGINS), times=st.integers(1, CAP + 2))
    def acquire(self, origin: Origin, times: int) -> None:
        # Several at once, so the cap and the queue come into play within few steps.
        for _ in range(times):
            if self.books.closed:
                with pytest.raises(PoolClosedError):
                    self.books.acquire(origin, self.now)
                return
            ticket, step = self.books.acquire(origin, self.now)
            self.apply(step)
            self.file(ticket)

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), succeed=st.booleans())
    def finish_connecting(self, data: st.DataObject, succeed: bool) -> None:
        ticket = self.slots.pop(data.draw(st.integers(0, len(self.slots) - 1)))
        if not succeed:
            self.apply(self.books.connect_failed(ticket.origin))
            return
        self.serial += 1
        conn = FakeConn(ticket.origin, self.serial)
        step = self.books.connected(ticket.origin, conn)
        if self.books.closed:
            assert step.to_close == [conn]
        else:
            self.held.append((Ticket(ticket.origin, connection=conn), conn))
        self.apply(step)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), reusable=st.booleans())
    def release(self, data: st.DataObject, reusable: bool) -> None:
        _, conn = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.apply(self.books.release(conn, self.now, reusable=reusable))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def abandon_granted(self, data: st.DataObject) -> None:
        ticket, _ = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.apply(self.books.abandon(ticket, self.now))

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def abandon_slot(self, data: st.DataObject) -> None:
        ticket = self.slots.pop(data.draw(st.integers(0, len(self.slots) - 1)))
        self.apply(self.books.abandon(ticket, self.now))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def abandon_waiting(self, data: st.DataObject) -> None:
        ticket = self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1)))
        self.apply(self.books.abandon(ticket, self.now))

    @precondition(lambda self: self.held and not self.books.closed)
    @rule(data=st.data())
    def retire_for_retry(self, data: st.DataObject) -> None:
        _, conn = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.apply(self.books.retire_for_retry(conn))
        self.slots.append(Ticket(conn.origin, may_connect=True))

    @rule(data=st.data())
    def peer_closes_an_idle_connection(self, data: st.DataObject) -> None:
        idle = [c for o in ORIGINS for c in self.books.idle_connections(o)]
        if idle:
            data.draw(st.sampled_from(idle)).peer_closed = True

    @rule(seconds=st.floats(0.0, 15.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def expire(self) -> None:
        self.apply(self.books.expire(self.now))

    @rule()
    def close(self) -> None:
        self.apply(self.books.close())

    @invariant()
    def within_the_cap(self) -> None:
        for origin in ORIGINS:
            total = (
                len(self.books.idle_connections(origin))
                + len(self.books.in_use_connections(origin))
                + self.books.connecting_count(origin)
            )
            assert total <= CAP

    @invariant()
    def idle_and_in_use_are_disjoint(self) -> None:
        for origin in ORIGINS:
            idle = self.books.idle_connections(origin)
            in_use = self.books.in_use_connections(origin)
            assert len(set(map(id, idle))) == len(idle)
            assert not set(map(id, idle)) & set(map(id, in_use))
            assert all(c.is_idle() for c in idle)
            assert not any(c.is_idle() for c in in_use)

    @invariant()
    def closed_connections_are_gone(self) -> None:
        closed = set(map(id, self.closed))
        for origin in ORIGINS:
            listed = self.books.idle_connections(origin) + self.books.in_use_connections(origin)
            assert not closed & set(map(id, listed))

    @invariant()
    def books_match_the_model(self) -> None:
        for origin in ORIGINS:
            held = {id(c) for _, c in self.held if c.origin == origin}
            assert {id(c) for c in self.books.in_use_connections(origin)} == held
            assert self.books.connecting_count(origin) == sum(t.origin == origin for t in self.slots)
            waiting = sum(t.origin == origin for t in self.waiting)
            assert self.books.waiting_count(origin) == waiting
            if waiting:  # nobody waits while something is idle or a slot is free
                assert not self.books.idle_connections(origin)
                assert len(self.books.in_use_connections(origin)) + self.books.connecting_count(origin) == CAP
        if self.books.closed:
            assert not any(self.books.idle_connections(o) or self.books.waiting_count(o) for o in ORIGINS)
        assert set(self.books.origins()) <= set(ORIGINS)


BooksMachine.TestCase.settings = settings(max_examples=examples(150), stateful_step_count=40, deadline=None)
TestBooks = BooksMachine.TestCase
