"""Calls and notes between the ``serve --workers N`` supervisor and its workers, over an inherited socket pair.

The supervisor creates one ``socketpair`` per worker and hands the worker its end as an inherited file descriptor
(``pass_fds``): no path on disk, no port, nobody else can connect. On that pair, each side may

* **call** the other (``await channel.call("reserve", plan)``) and wait for its reply (under the caller's
  deadline), or
* send a **note** (``channel.notify("key_state", key_id, fields)``), which never waits: it is queued and written by
  the channel's writer task, so the balancer can share a state change from synchronous code.

Wire format (sans-IO, :func:`encode_frame` and :class:`FrameDecoder`): frames of a 4-byte big-endian length and a
pickle of one message tuple::

    ("call", id, method, args)    ("reply", id, ok, value)    ("note", 0, method, args)

Pickle, because the payloads are the limiter's own dataclasses (plans, answers, reservations) and Prometheus
metric families, and both ends are the same program of the same user: the supervisor and the children it
started, on a pair nobody else holds. It must never carry bytes from anyone else.

Handlers: ``handlers`` are synchronous and run inline in the reader, in the order the frames arrived (the
supervisor's limit counters: atomic because nothing awaits in them); ``async_handlers`` run as tasks in the
channel's nursery (a call that itself calls the other workers), so a slow one never holds up the reader.

Resource handling: :meth:`Channel.run` owns the stream and its reader and writer tasks; when the peer closes
(or the channel is cancelled) pending calls fail with :class:`ChannelClosed` and the stream is closed.

Error handling: a handler that raises answers the call with an error, re-raised at the caller as
:class:`RemoteError`; an unknown method is such an error too. A note whose handler raises is logged and
dropped. A frame over :data:`MAX_FRAME_BYTES`, or one that does not unpickle, breaks the channel
(:class:`ChannelBroken`, logged): both ends are ours, so it is a bug, not input to tolerate. :meth:`Channel.run`
never raises but ``trio.Cancelled``: its caller learns of the end from its return.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from trioproxy.errors import TrioProxyError

logger = logging.getLogger(__name__)

# A gathered metrics report of a worker is some tens of KB; anything near this is a bug.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Notes waiting for the writer: past this, a peer that stopped reading loses notes (logged), never memory.
MAX_OUTBOX = 10_000
# A peer whose socket buffer stays full this long is stuck: the channel is broken rather than left to grow.
SEND_TIMEOUT = 10.0
RECEIVE_BYTES = 65536

_LENGTH = struct.Struct(">I")


class ChannelClosed(TrioProxyError):
    """The other process closed the channel (it exited), or the channel was stopped."""


class ChannelBroken(ChannelClosed):
    """The channel carried something it cannot (an oversized or unreadable frame, a stuck peer)."""


class RemoteError(TrioProxyError):
    """The other process's handler raised; ``message`` names its exception."""


def encode_frame(message: tuple[Any, ...]) -> bytes:
    """One message as a frame: its length, then its pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME_BYTES:
        raise ChannelBroken(f"a {message[0]!r} message of {len(payload)} bytes is over the frame limit")
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Bytes in, messages out (sans-IO): buffers a partial frame until the rest arrives."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def __repr__(self) -> str:
        return f"<FrameDecoder buffered={len(self._buffer)}>"

    def feed(self, data: bytes | bytearray) -> list[tuple[Any, ...]]:
        """Add received bytes; return every message now complete, in order."""
        buffer = self._buffer
        buffer += data
        messages: list[tuple[Any, ...]] = []
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > self._max:
                raise ChannelBroken(f"a frame of {length} bytes is over the limit of {self._max}")
            end = start + _LENGTH.size + length
            if len(buffer) < end:
                break
            try:
                message = pickle.loads(memoryview(buffer)[start + _LENGTH.size : end])
            except Exception as exc:
                raise ChannelBroken(f"a frame does not unpickle: {type(exc).__name__}") from exc
            if not isinstance(message, tuple) or len(message) != 4:
                raise ChannelBroken("a frame is not a message tuple")
            messages.append(message)
            start = end
        del buffer[:start]
        return messages


SyncHandler = Callable[..., Any]
AsyncHandler = Callable[..., Awaitable[Any]]


class _PendingCall:
    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.value: Any = None


class Channel:
    """One end of a supervisor-worker pair; see the module docstring. Run it with :meth:`run`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        name: str,
        *,
        handlers: Mapping[str, SyncHandler] | None = None,
        async_handlers: Mapping[str, AsyncHandler] | None = None,
    ) -> None:
        self.name = name
        self._stream = stream
        # Looked up at every frame (not copied): an owner may add handlers while the channel runs.
        self._handlers: Mapping[str, SyncHandler] = handlers if handlers is not None else {}
        self._async_handlers: Mapping[str, AsyncHandler] = (
            async_handlers if async_handlers is not None else {}
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, _PendingCall] = {}
        self._outbox: deque[bytes] = deque()
        self._more = trio.Event()
        self._closed = False
        self.dropped_notes = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Channel {self.name} {state} pending={len(self._pending)} outbox={len(self._outbox)}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sending ------------------------------------------------------------------------------------------------

    def notify(self, method: str, *args: Any) -> bool:
        """Queue a note for the other process; never waits. False when it was dropped (and counted): the
        channel is closed or the outbox is full."""
        if self._closed or len(self._outbox) >= MAX_OUTBOX:
            self.dropped_notes += 1
            if self.dropped_notes == 1 or self.dropped_notes % 1000 == 0:
                logger.warning("%s: %d notes dropped so far", self.name, self.dropped_notes)
            return False
        self._send(("note", 0, method, args))
        return True

    async def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` in the other process and return its result. The caller bounds the wait (a reply
        that arrives after its caller gave up is ignored).

        Raises :class:`ChannelClosed` when the channel is (or becomes) closed, :class:`RemoteError` when the
        handler raised.
        """
        if self._closed:
            raise ChannelClosed(f"{self.name}: the channel is closed")
        call_id = next(self._ids)
        pending = self._pending[call_id] = _PendingCall()
        try:
            self._send(("call", call_id, method, args))
            await pending.done.wait()
        finally:
            del self._pending[call_id]
        if pending.ok:
            return pending.value
        if isinstance(pending.value, ChannelClosed):
            raise pending.value
        raise RemoteError(f"{self.name}: {method} failed in the other process: {pending.value}")

    def _send(self, message: tuple[Any, ...]) -> None:
        self._outbox.append(encode_frame(message))
        self._more.set()

    # -- the tasks ----------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and write until the peer closes the channel (then return) or this task is cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, nursery.cancel_scope)
                task_status.started()
                try:
                    await self._read(nursery)
                except ChannelBroken as exc:
                    logger.error("%s", exc.message)
                nursery.cancel_scope.cancel()
        finally:
            self._close(ChannelClosed(f"{self.name}: the channel is closed"))
            with trio.move_on_after(1, shield=True):
                await self._stream.aclose()

    def _close(self, reason: ChannelClosed) -> None:
        self._closed = True
        self._outbox.clear()
        for pending in self._pending.values():
            pending.ok, pending.value = False, reason
            pending.done.set()

    async def _write(self, channel_scope: trio.CancelScope) -> None:
        while True:
            if not self._outbox:
                self._more = trio.Event()
                await self._more.wait()
                continue
            data = b"".join(self._outbox)
            self._outbox.clear()
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    await self._stream.send_all(data)
            except trio.TooSlowError:
                logger.error("%s: the other process stopped reading: closing the channel", self.name)
                channel_scope.cancel()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the end and closes the channel

    async def _read(self, nursery: trio.Nursery) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for kind, ident, first, args in decoder.feed(data):
                if kind == "reply":
                    pending = self._pending.get(ident)
                    if pending is not None:  # else: its caller gave up (deadline)
                        pending.ok, pending.value = bool(first), args
                        pending.done.set()
                elif kind == "call" or kind == "note":
                    self._dispatch(nursery, kind, ident, first, args)
                else:
                    raise ChannelBroken(f"{self.name}: a message of unknown kind {kind!r}")

    def _dispatch(
        self, nursery: trio.Nursery, kind: str, ident: int, method: str, args: tuple[Any, ...]
    ) -> None:
        handler = self._handlers.get(method)
        if handler is not None:
            try:
                result = handler(*args)
            except Exception as exc:
                self._answer(kind, ident, method, exc)
            else:
                self._answer(kind, ident, method, None, result)
            return
        async_handler = self._async_handlers.get(method)
        if async_handler is None:
            self._answer(kind, ident, method, LookupError(f"no handler for {method!r}"))
            return
        nursery.start_soon(self._run_async, async_handler, kind, ident, method, args)

    async def _run_async(
        self, handler: AsyncHandler, kind: str, ident: int, method: str, args: tuple[Any, ...]
    ) -> None:
        try:
            result = await handler(*args)
        except Exception as exc:
            self._answer(kind, ident, method, exc)
        else:
            self._answer(kind, ident, method, None, result)

    def _answer(
        self, kind: str, ident: int, method: str, error: Exception | None, result: Any = None
    ) -> None:
        if kind == "note":
            if error is not None:
                logger.error("%s: note %s failed: %s: %s", self.name, method, type(error).__name__, error)
            return
        if self._closed:
            return
        if error is None:
            try:
                self._send(("reply", ident, True, result))
                return
            except Exception as exc:  # whatever pickling raises: the caller gets an error instead of a hang
                error = exc
        self._send(("reply", ident, False, f"{type(error).__name__}: {error}"))
