"""A TCP stream for the hot path: trio's stream contract on a non-blocking socket, with fewer layers.

``trio.SocketStream`` wraps each operation in a conflict detector, an error-translating context manager and
trio's ``_try_sync`` helper around a ``trio.socket`` method: several Python frames and context managers per
``send``/``recv``, measured at 10-15% of the proxy's CPU per request. :class:`FastSocketStream` keeps the
parts of that contract the data plane relies on and nothing else:

* every operation is a checkpoint: it raises ``trio.Cancelled`` before touching the socket if its scope is
  already cancelled, and yields to the scheduler once (after a syscall that succeeded at once, or by waiting
  for readiness), so a relay loop that never blocks still lets other tasks run;
* no byte is lost to a cancellation: a ``recv`` that returned data always returns it;
* errors are trio's: a reset or broken pipe is ``trio.BrokenResourceError``, use after :meth:`aclose` is
  ``trio.ClosedResourceError``.

It does not detect two tasks using one direction at once (trio's conflict detector): each direction of a
connection is used by one task at a time by construction (the connection task writes, the watcher reads
while the handler runs; the pool hands an upstream connection to one request). TLS connections keep using
``trio.SSLStream`` over ``trio.SocketStream``.
"""

from __future__ import annotations

import errno
import math
import select
import socket

import trio

# The default read size: one read takes a whole request head and a typical body (httpcore and hypercorn
# read 64 KiB too).
RECEIVE_SIZE = 64 * 1024

_BROKEN_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}
)


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A connected, non-blocking stdlib TCP socket as a trio stream (see the module docstring)."""

    __slots__ = ("_closed", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    @classmethod
    def from_trio_socket(cls, trio_socket: trio.socket.SocketType) -> FastSocketStream:
        """Take over the descriptor of a connected ``trio.socket`` socket (which is left detached)."""
        family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
        return cls(socket.socket(family, kind, proto, fileno=trio_socket.detach()))

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def setsockopt(self, level: int, option: int, value: int | bool) -> None:
        self._sock.setsockopt(level, option, value)

    def getpeername(self) -> tuple[str, int]:
        peer = self._sock.getpeername()
        return str(peer[0]), int(peer[1])

    def is_readable(self) -> bool:
        """Whether a read would not block right now (data, EOF or an error is pending)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return bool(poller.poll(0))

    def receive_nowait(self, max_bytes: int | None = None) -> bytes | None:
        """The bytes waiting to be read (``b""`` at EOF), or None if a read would block. Not a checkpoint."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            return self._sock.recv(RECEIVE_SIZE if max_bytes is None else max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _translate(exc) from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.receive_some_before(math.inf, max_bytes)
        assert data is not None  # no deadline: it cannot pass
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all_before(data, math.inf)

    async def send_all_before(self, data: bytes | bytearray | memoryview, deadline: float) -> bool:
        """:meth:`send_all`, giving up at ``deadline`` (trio time): False then, and the stream is mid-message.

        A send that completes at once never builds a cancel scope (most writes of a proxy do).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:  # even for b"": trio's streams refuse any use after aclose
            raise trio.ClosedResourceError("the connection was closed")
        sock = self._sock
        view = memoryview(data)
        waited = False
        while view:
            if self._closed:
                raise trio.ClosedResourceError("the connection was closed")
            try:
                sent = sock.send(view)
            except BlockingIOError:
                with trio.CancelScope(deadline=deadline) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    return False
                waited = True
                continue
            except OSError as exc:
                raise _translate(exc) from exc
            view = view[sent:]
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return True

    async def receive_some_before(self, deadline: float, max_bytes: int | None = None) -> bytes | None:
        """:meth:`receive_some`, giving up at ``deadline`` (trio time): None then. Data already waiting is
        read without building a cancel scope."""
        await trio.lowlevel.checkpoint_if_cancelled()
        size = RECEIVE_SIZE if max_bytes is None else max_bytes
        sock = self._sock
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the connection was closed")
            try:
                data = sock.recv(size)
            except BlockingIOError:
                with trio.CancelScope(deadline=deadline) as scope:
                    await trio.lowlevel.wait_readable(sock)
                if scope.cancelled_caught:
                    return None
                continue
            except OSError as exc:
                raise _translate(exc) from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        await trio.lowlevel.wait_writable(self._sock)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wake any task blocked on this descriptor (it sees ClosedResourceError), then close it.
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


async def send_all_before(
    stream: trio.abc.SendStream, data: bytes | bytearray | memoryview, deadline: float
) -> bool:
    """Send all of ``data`` unless ``deadline`` (trio time) passes first (False: the stream is mid-message)."""
    if type(stream) is FastSocketStream:
        return await stream.send_all_before(data, deadline)
    with trio.CancelScope(deadline=deadline):
        await stream.send_all(data)
        return True
    return False


async def receive_some_before(
    stream: trio.abc.ReceiveStream, deadline: float, max_bytes: int | None = None
) -> bytes | None:
    """The next bytes of ``stream`` (``b""`` at EOF), or None if ``deadline`` (trio time) passes first."""
    if type(stream) is FastSocketStream:
        return await stream.receive_some_before(deadline, max_bytes)
    with trio.CancelScope(deadline=deadline):
        return bytes(await stream.receive_some(max_bytes))
    return None


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the connection was closed")
    if exc.errno in _BROKEN_ERRNOS:
        return trio.BrokenResourceError(f"the connection broke: {errno.errorcode.get(exc.errno, exc.errno)}")
    return trio.BrokenResourceError(f"socket error {exc.errno}")
