"""Test support for the Redis modes: the real server at 127.0.0.1:6379, per-test key prefixes, and a relay that
can cut the connection to simulate an outage without stopping the shared server."""

from __future__ import annotations

import os
import socket

import coredis
import pytest
import trio

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def require_redis() -> str:
    """The Redis URL; skips when Redis is down, except under CI=true where a missing service is a failure."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2.0) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
            problem = "did not answer PING"
    except OSError as exc:
        problem = str(exc)
    message = f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable ({problem})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix:``."""
    client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(keys)


class Relay:
    """A TCP relay to Redis that can be cut (listener and every connection closed) and restored on its port."""

    def __init__(self) -> None:
        self.port = 0
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, nursery: trio.Nursery) -> None:
        self.port = await nursery.start(self._serve, self.port)

    def cut(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, port: int, task_status: trio.TaskStatus[int]) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(REDIS_HOST, REDIS_PORT)
        except OSError:
            await trio.aclose_forcefully(client)
            return

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(sink)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)
