"""Cancellation at each await of an exchange: the connection is closed, never reused; Cancelled propagates.

The counterpart of httpcore's ``tests/test_cancellations.py``, on real sockets with a small h11 server.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing

from trioproxy.errors import PoolClosedError
from trioproxy.pool import ConnectionPool, ExchangeTimeouts, UpstreamRequest
from trioproxy.snapshot import Origin

TIMEOUTS = ExchangeTimeouts(connect=5.0, first_byte=5.0, idle=5.0)


class Server:
    """Answers ``/ok`` in full, ``/stream`` with a head and one chunk, ``/silent`` never; records EOFs."""

    def __init__(self) -> None:
        self.connections = 0
        self.eofs: list[trio.Event] = []
        self.body_started = trio.Event()
        self.request_seen = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        eof = trio.Event()
        self.eofs.append(eof)
        conn = h11.Connection(h11.SERVER)
        target = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    conn.receive_data(data)
                elif isinstance(event, h11.EndOfMessage):
                    self.request_seen.set()
                    if target == b"/ok":
                        await stream.send_all(
                            conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                            + (conn.send(h11.Data(data=b"ok")) or b"")
                            + (conn.send(h11.EndOfMessage()) or b"")
                        )
                        conn.start_next_cycle()
                    elif target == b"/stream":
                        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
                        await stream.send_all(conn.send(head) + (conn.send(h11.Data(data=b"first")) or b""))
                        self.body_started.set()
                        while await stream.receive_some(65536):
                            pass
                        break
                    else:  # /silent: read on, never answer
                        while await stream.receive_some(65536):
                            pass
                        break
                elif isinstance(event, h11.Request):
                    target = bytes(event.target)
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except (trio.BrokenResourceError, h11.ProtocolError):
            pass
        finally:
            eof.set()
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def server_and_pool(cap: int = 4) -> AsyncIterator[tuple[Server, Origin, ConnectionPool]]:
    server = Server()
    pool = ConnectionPool(
        max_connections_per_origin=cap,
        idle_expiry=60.0,
        ssl_context=ssl.create_default_context(),
        address_allowed=lambda ip: ip == "127.0.0.1",
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        await nursery.start(pool.run)
        yield server, Origin("http", "127.0.0.1", listeners[0].socket.getsockname()[1]), pool
        nursery.cancel_scope.cancel()


def request(origin: Origin, target: bytes) -> UpstreamRequest:
    return UpstreamRequest(b"GET", target, [(b"host", origin.host_header.encode())], b"")


async def get_ok(pool: ConnectionPool, origin: Origin) -> bytes:
    async with pool.exchange(origin, request(origin, b"/ok"), TIMEOUTS) as response:
        chunks = []
        while data := await response.receive_some():
            chunks.append(data)
        return b"".join(chunks)


async def test_cancel_while_reading_the_body_closes_the_socket() -> None:
    async with server_and_pool() as (server, origin, pool):
        assert await get_ok(pool, origin) == b"ok"  # one pooled connection that could be reused
        with trio.CancelScope() as scope:
            async with pool.exchange(origin, request(origin, b"/stream"), TIMEOUTS) as response:
                assert await response.receive_some() == b"first"
                scope.cancel()
                await response.receive_some()
            pytest.fail("the cancelled read returned")
        assert scope.cancelled_caught  # Cancelled reached its scope: nothing swallowed it
        with trio.fail_after(5):
            await server.eofs[0].wait()  # the server saw our close
        stats = pool.stats()
        assert (stats.idle, stats.in_use, stats.reused) == (0, 0, 1)
        assert await get_ok(pool, origin) == b"ok"
        assert server.connections == 2  # never reused after the cancellation


async def test_cancel_while_waiting_for_the_head_closes_the_socket() -> None:
    async with server_and_pool() as (server, origin, pool):
        async with trio.open_nursery() as nursery:

            async def wait_for_head() -> None:
                async with pool.exchange(origin, request(origin, b"/silent"), TIMEOUTS):
                    pytest.fail("a head arrived")

            nursery.start_soon(wait_for_head)
            with trio.fail_after(5):
                await server.request_seen.wait()
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            await server.eofs[0].wait()
        assert pool.stats().idle == 0
        assert pool.stats().in_use == 0


async def test_cancel_while_queued_for_a_slot_leaves_no_ghost() -> None:
    async with server_and_pool(cap=1) as (server, origin, pool):
        release = trio.Event()
        holding = trio.Event()

        async def hog() -> None:
            async with pool.exchange(origin, request(origin, b"/ok"), TIMEOUTS) as response:
                while await response.receive_some():
                    pass
                holding.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            await holding.wait()
            with trio.move_on_after(0.05) as scope:
                await get_ok(pool, origin)
            assert scope.cancelled_caught
            assert pool.stats().waiting == 0
            release.set()
        assert await get_ok(pool, origin) == b"ok"
        assert server.connections == 1


async def test_cancel_while_connecting_frees_the_slot() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:  # a full accept queue: our connect hangs
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            async with server_and_pool(cap=1) as (_, _, pool):
                stuck = Origin("http", "127.0.0.1", port)
                with trio.move_on_after(0.05) as scope:
                    await get_ok(pool, stuck)
                assert scope.cancelled_caught
                stats = pool.stats()
                assert (stats.connecting, stats.origins, stats.opened) == (0, 0, 0)
        finally:
            for filler in fillers:
                filler.close()


class Boom(Exception):
    pass


async def test_an_error_in_the_block_closes_the_connection_and_propagates() -> None:
    async with server_and_pool() as (server, origin, pool):

        async def fail_inside() -> None:
            async with pool.exchange(origin, request(origin, b"/ok"), TIMEOUTS) as response:
                assert await response.receive_some() == b"ok"
                raise Boom

        with pytest.raises(Boom):
            await fail_inside()
        with trio.fail_after(5):
            await server.eofs[0].wait()
        assert pool.stats().idle == 0


async def test_leaving_the_block_before_the_body_ends_closes_the_connection() -> None:
    async with server_and_pool() as (server, origin, pool):
        async with pool.exchange(origin, request(origin, b"/stream"), TIMEOUTS) as response:
            assert await response.receive_some() == b"first"
        assert not response.complete
        with trio.fail_after(5):
            await server.eofs[0].wait()
        assert pool.stats().idle == 0


async def test_shutdown_during_an_exchange_ends_it_with_pool_closed() -> None:
    server = Server()
    pool = ConnectionPool(
        max_connections_per_origin=2,
        idle_expiry=60.0,
        ssl_context=ssl.create_default_context(),
        address_allowed=lambda ip: ip == "127.0.0.1",
    )
    async with trio.open_nursery() as outer:
        listeners = await outer.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        origin = Origin("http", "127.0.0.1", listeners[0].socket.getsockname()[1])
        services = trio.CancelScope()

        async def run_pool(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with services:
                await pool.run(task_status=task_status)

        await outer.start(run_pool)

        async def read_until_shutdown() -> None:
            async with pool.exchange(origin, request(origin, b"/stream"), TIMEOUTS) as response:
                assert await response.receive_some() == b"first"
                with pytest.raises(PoolClosedError):
                    await response.receive_some()

        async with trio.open_nursery() as requests:
            requests.start_soon(read_until_shutdown)
            await server.body_started.wait()
            await trio.testing.wait_all_tasks_blocked()
            services.cancel()  # the pool's housekeeping ends: shutdown
        with trio.fail_after(5):
            await server.eofs[0].wait()
        assert pool.closed
        outer.cancel_scope.cancel()
