"""The upstream connection pool: keep-alive HTTP/1.1 connections to providers, reused most-recent-first.

Two layers, after httpcore's ``connection_pool.py``:

- :class:`PoolBooks` is a synchronous state machine over plain objects. It decides which connection a request
  gets, who waits, what expires; it never awaits, and every operation *returns* a :class:`Step` naming the
  connections to close and the waiting requests to wake. It is tested without sockets (a hypothesis
  ``RuleBasedStateMachine`` checks its invariants).
- :class:`ConnectionPool` is the thin trio layer: it applies each step (closing under a bounded shield), opens
  connections (:func:`~trioproxy.upstream_conn.open_upstream_connection`) and runs one exchange at a time on a
  connection (:class:`~trioproxy.upstream_conn.UpstreamConnection`).

Reuse rules: the most recently used idle connection first (LIFO, like urllib3: warm connections stay warm,
cold ones age out); at most ``max_connections_per_origin`` connections (idle, in use or being opened) per
origin, further requests wait first-in first-out; idle connections expire after ``idle_expiry`` seconds; an
idle connection the provider closed is noticed (non-blocking readability check) and dropped, not handed out.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

from trioproxy.errors import PoolClosedError, UpstreamTimeoutError
from trioproxy.snapshot import Origin
from trioproxy.upstream_conn import (
    CLOSE_GRACE,
    ExchangeTimeouts,
    StaleConnectionError,
    UpstreamConnection,
    UpstreamRequest,
    UpstreamResponse,
    open_upstream_connection,
)

__all__ = [
    "ConnectionPool",
    "ExchangeTimeouts",
    "PoolBooks",
    "PoolStats",
    "Step",
    "Ticket",
    "UpstreamRequest",
    "UpstreamResponse",
]

# How often the housekeeping task looks for expired or peer-closed idle connections. Checkout checks the
# connection it hands out anyway, so this only bounds how long a dead socket lingers in the books.
HOUSEKEEPING_INTERVAL = 1.0


class PoolConnection(Protocol):
    """What the bookkeeping needs from a connection (UpstreamConnection, or a fake in tests)."""

    origin: Origin

    def is_idle(self) -> bool: ...
    def is_available(self) -> bool: ...
    def has_expired(self, now: float) -> bool: ...
    def mark_idle(self, expires_at: float) -> None: ...
    def mark_in_use(self) -> None: ...


C = TypeVar("C", bound=PoolConnection)


@dataclass(eq=False)
class Ticket(Generic[C]):
    """One request's claim on the pool; granted at once or later, while it waits in its origin's queue.

    Exactly one grant is set when granted: an idle ``connection`` to reuse, ``may_connect`` (a slot under the
    cap for a new connection, which the holder must follow with ``connected`` or ``connect_failed``), or
    ``pool_closed``.
    """

    origin: Origin
    connection: C | None = None
    may_connect: bool = False
    pool_closed: bool = False

    @property
    def granted(self) -> bool:
        return self.connection is not None or self.may_connect or self.pool_closed


@dataclass
class Step(Generic[C]):
    """What the I/O layer must do after a bookkeeping operation."""

    to_close: list[C] = field(default_factory=list)
    woken: list[Ticket[C]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PoolStats:
    origins: int
    idle: int
    in_use: int
    connecting: int
    waiting: int
    opened: int = 0  # connections opened since start
    reused: int = 0  # exchanges that got an already open connection
    stale_retries: int = 0  # requests resent once on a fresh connection (see StaleConnectionError)


class _OriginBooks(Generic[C]):
    __slots__ = ("connecting", "idle", "in_use", "waiters")

    def __init__(self) -> None:
        self.idle: list[C] = []  # oldest release first; reuse pops from the end (LIFO)
        self.in_use: dict[C, None] = {}  # a dict keeps insertion order for deterministic closing
        self.connecting = 0  # slots granted for connections being opened
        self.waiters: deque[Ticket[C]] = deque()

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.in_use) + self.connecting

    @property
    def empty(self) -> bool:
        return self.total == 0 and not self.waiters


class PoolBooks(Generic[C]):
    """The pool's bookkeeping: synchronous, no I/O, no clock of its own (``now`` is passed in).

    Invariants, per origin: idle + in use + connecting never exceeds the cap; a connection is never both idle
    and in use; a connection returned for closing is gone from the books; requests wait only while the origin
    is at its cap with nothing idle (a freed slot or a released connection goes to the oldest waiter).
    """

    def __init__(self, *, max_per_origin: int, idle_expiry: float) -> None:
        if max_per_origin < 1:
            raise ValueError("max_per_origin must be at least 1")
        self.max_per_origin = max_per_origin
        self.idle_expiry = idle_expiry
        self.closed = False
        self._origins: dict[Origin, _OriginBooks[C]] = {}

    def acquire(self, origin: Origin, now: float) -> tuple[Ticket[C], Step[C]]:
        """Claim: an available idle one (newest first), a slot to open one, or a place in line."""
        if self.closed:
            raise PoolClosedError("the upstream connection pool is closed")
        books = self._origins.setdefault(origin, _OriginBooks())
        step: Step[C] = Step()
        self._drop_expired(books, now, step)
        ticket: Ticket[C] = Ticket(origin)
        while books.idle:
            conn = books.idle.pop()
            if conn.is_available():
                conn.mark_in_use()
                books.in_use[conn] = None
                ticket.connection = conn
                return ticket, step
            step.to_close.append(conn)
            self._slot_freed(books, step)
        if not books.waiters and books.total < self.max_per_origin:
            books.connecting += 1
            ticket.may_connect = True
        else:
            books.waiters.append(ticket)
        return ticket, step

    def connected(self, origin: Origin, conn: C) -> Step[C]:
        """A granted slot became an open connection, now in use (closed at once if the pool closed since)."""
        books = self._origins[origin]
        books.connecting -= 1
        step: Step[C] = Step()
        if self.closed:
            step.to_close.append(conn)
            self._forget_if_empty(origin)
        else:
            conn.mark_in_use()
            books.in_use[conn] = None
        return step

    def connect_failed(self, origin: Origin) -> Step[C]:
        """A granted slot was not turned into a connection; it passes to the next waiter."""
        books = self._origins[origin]
        books.connecting -= 1
        step: Step[C] = Step()
        self._slot_freed(books, step)
        self._forget_if_empty(origin)
        return step

    def release(self, conn: C, now: float, *, reusable: bool) -> Step[C]:
        """An exchange ended: hand the connection to the oldest waiter, keep it idle, or close it."""
        step: Step[C] = Step()
        books = self._origins.get(conn.origin)
        if books is None or conn not in books.in_use:
            # Already out of the books (the pool closed, or a stale connection was retired): close it anyway.
            step.to_close.append(conn)
            return step
        del books.in_use[conn]
        if not reusable or self.closed:
            step.to_close.append(conn)
            self._slot_freed(books, step)
        elif books.waiters:
            ticket = books.waiters.popleft()
            ticket.connection = conn
            books.in_use[conn] = None
            step.woken.append(ticket)
        else:
            conn.mark_idle(now + self.idle_expiry)
            books.idle.append(conn)
        self._forget_if_empty(conn.origin)
        return step

    def retire_for_retry(self, conn: C) -> Step[C]:
        """Turn a stale in-use connection into a slot for its replacement, without queueing again."""
        if self.closed:
            raise PoolClosedError("the upstream connection pool is closed")
        books = self._origins[conn.origin]
        del books.in_use[conn]
        books.connecting += 1
        return Step(to_close=[conn])

    def abandon(self, ticket: Ticket[C], now: float) -> Step[C]:
        """Its holder gave up (timeout, cancellation): leave the line, or give back what was granted."""
        if ticket.connection is not None:
            conn, ticket.connection = ticket.connection, None
            return self.release(conn, now, reusable=True)
        if ticket.may_connect:
            ticket.may_connect = False
            return self.connect_failed(ticket.origin)
        books = self._origins.get(ticket.origin)
        if books is not None and ticket in books.waiters:
            books.waiters.remove(ticket)
            self._forget_if_empty(ticket.origin)
        return Step()

    def expire(self, now: float) -> Step[C]:
        """Drop idle connections that expired or that the provider closed (the housekeeping pass)."""
        step: Step[C] = Step()
        for origin, books in list(self._origins.items()):
            self._drop_expired(books, now, step)
            keep: list[C] = []
            for conn in books.idle:
                if conn.is_available():
                    keep.append(conn)
                else:
                    step.to_close.append(conn)
            dropped = len(books.idle) - len(keep)
            books.idle = keep
            for _ in range(dropped):
                self._slot_freed(books, step)
            self._forget_if_empty(origin)
        return step

    def close(self) -> Step[C]:
        """Shut down: every known connection is to be closed and every waiter is woken with ``pool_closed``.

        Connections being opened right now are closed by ``connected`` when they arrive.
        """
        self.closed = True
        step: Step[C] = Step()
        for origin, books in list(self._origins.items()):
            step.to_close.extend(books.idle)
            step.to_close.extend(books.in_use)
            books.idle.clear()
            books.in_use.clear()
            while books.waiters:
                ticket = books.waiters.popleft()
                ticket.pool_closed = True
                step.woken.append(ticket)
            self._forget_if_empty(origin)
        return step

    def stats(self) -> PoolStats:
        origins = self._origins.values()
        return PoolStats(
            origins=len(self._origins),
            idle=sum(len(b.idle) for b in origins),
            in_use=sum(len(b.in_use) for b in origins),
            connecting=sum(b.connecting for b in origins),
            waiting=sum(len(b.waiters) for b in origins),
        )

    # Read-only views for tests and debugging.
    def idle_connections(self, origin: Origin) -> list[C]:
        books = self._origins.get(origin)
        return list(books.idle) if books is not None else []

    def in_use_connections(self, origin: Origin) -> list[C]:
        books = self._origins.get(origin)
        return list(books.in_use) if books is not None else []

    def connecting_count(self, origin: Origin) -> int:
        books = self._origins.get(origin)
        return books.connecting if books is not None else 0

    def waiting_count(self, origin: Origin) -> int:
        books = self._origins.get(origin)
        return len(books.waiters) if books is not None else 0

    def origins(self) -> list[Origin]:
        return list(self._origins)

    def _drop_expired(self, books: _OriginBooks[C], now: float, step: Step[C]) -> None:
        # Idle connections are appended as they are released: the oldest (first to expire) are at the front.
        while books.idle and books.idle[0].has_expired(now):
            step.to_close.append(books.idle.pop(0))
            self._slot_freed(books, step)

    def _slot_freed(self, books: _OriginBooks[C], step: Step[C]) -> None:
        if books.waiters and not self.closed:
            ticket = books.waiters.popleft()
            books.connecting += 1
            ticket.may_connect = True
            step.woken.append(ticket)

    def _forget_if_empty(self, origin: Origin) -> None:
        # Origins come and go with the configuration; an empty entry must not outlive its last connection.
        books = self._origins.get(origin)
        if books is not None and books.empty:
            del self._origins[origin]


class ConnectionPool:
    """Keep-alive connections to providers, shared by every request of the process.

    Resource handling: :meth:`run` belongs in the services nursery; when it is cancelled (shutdown) the pool
    closes and closes every connection under a bounded shield. :meth:`exchange` lends a connection for one
    request/response and takes it back when the ``async with`` block ends: back into the pool only if the
    response was read to its end and the connection is reusable; closed otherwise (exception,
    cancellation, timeout, partially read body, ``Connection: close``).

    Error handling: :meth:`exchange` raises only :class:`~trioproxy.errors.TrioProxyError` subclasses of its
    own (connect, timeout, protocol, died, pool closed) and lets everything else, ``trio.Cancelled`` included,
    pass through untouched.
    """

    def __init__(
        self,
        *,
        max_connections_per_origin: int,
        idle_expiry: float,
        ssl_context: ssl.SSLContext,
        address_allowed: Callable[[str], bool],
        max_response_header_bytes: int = 16 * 1024,
    ) -> None:
        # We speak HTTP/1.1 only; offering just that in ALPN stops a provider from picking h2.
        ssl_context.set_alpn_protocols(["http/1.1"])
        self._ssl_context = ssl_context
        self._address_allowed = address_allowed
        self._max_head_bytes = max_response_header_bytes
        self._books: PoolBooks[UpstreamConnection] = PoolBooks(
            max_per_origin=max_connections_per_origin, idle_expiry=idle_expiry
        )
        self._wakeups: dict[Ticket[UpstreamConnection], trio.Event] = {}
        self._opened = 0
        self._reused = 0
        self._stale_retries = 0

    @property
    def books(self) -> PoolBooks[UpstreamConnection]:
        return self._books

    @property
    def closed(self) -> bool:
        return self._books.closed

    def stats(self) -> PoolStats:
        current = self._books.stats()
        return PoolStats(
            origins=current.origins,
            idle=current.idle,
            in_use=current.in_use,
            connecting=current.connecting,
            waiting=current.waiting,
            opened=self._opened,
            reused=self._reused,
            stale_retries=self._stale_retries,
        )

    def __repr__(self) -> str:
        s = self.stats()
        state = "CLOSED" if self.closed else "OPEN"
        return (
            f"<ConnectionPool [{state}, origins: {s.origins}, idle: {s.idle}, in use: {s.in_use}, "
            f"connecting: {s.connecting}, waiting: {s.waiting}]>"
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Housekeeping until cancelled: close expired and peer-closed idle connections; then close all."""
        task_status.started()
        try:
            while True:
                await trio.sleep(HOUSEKEEPING_INTERVAL)
                await self._apply(self._books.expire(trio.current_time()))
        finally:
            await self._apply(self._books.close())

    @asynccontextmanager
    async def exchange(
        self,
        origin: Origin,
        request: UpstreamRequest,
        timeouts: ExchangeTimeouts,
        on_slow: Callable[[], None] | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send ``request`` to ``origin`` and yield the response once its head arrived.

        ``on_slow`` runs once, the first time the exchange waits for the provider longer than
        :data:`~trioproxy.upstream_conn.SLOW_WAIT` (head or body).

        The block reads the body with ``response.receive_some()``. The overall request deadline is the
        caller's cancel scope; the phase timeouts of ``timeouts`` nest inside it. Redirects are not followed.

        A reused connection that turns out dead before any response byte (see
        :class:`~trioproxy.upstream_conn.StaleConnectionError` for the exact conditions) is replaced once by a
        fresh connection and the request is sent again; nothing else is ever retried here.
        """
        conn = await self._checkout(origin, timeouts)
        try:
            try:
                response = await conn.start(request, timeouts, on_slow)
            except StaleConnectionError:
                self._stale_retries += 1
                await self._apply(self._books.retire_for_retry(conn))
                conn = await self._connect(origin, timeouts)
                response = await conn.start(request, timeouts, on_slow)
            yield response
        except BaseException:
            # Cancellation included: the connection is in an unknown state, so it is closed, never reused.
            await self._discard(conn)
            raise
        reusable = conn.finish_cycle()
        await self._apply(self._books.release(conn, trio.current_time(), reusable=reusable))

    async def _checkout(self, origin: Origin, timeouts: ExchangeTimeouts) -> UpstreamConnection:
        ticket, step = self._books.acquire(origin, trio.current_time())
        try:
            await self._apply(step)
            if not ticket.granted:
                await self._wait(ticket, timeouts.connect)
        except BaseException:
            await self._apply(self._books.abandon(ticket, trio.current_time()))
            raise
        if ticket.pool_closed:
            raise PoolClosedError("the upstream connection pool is closed")
        if ticket.connection is not None:
            self._reused += 1
            return ticket.connection
        return await self._connect(origin, timeouts)

    async def _wait(self, ticket: Ticket[UpstreamConnection], patience: float) -> None:
        event = trio.Event()
        self._wakeups[ticket] = event
        try:
            with trio.fail_after(patience):
                await event.wait()
        except trio.TooSlowError:
            origin = ticket.origin
            raise UpstreamTimeoutError(
                f"pool full: no connection to {origin.scheme}://{origin.host_header} became free "
                f"within {patience:g}s"
            ) from None
        finally:
            del self._wakeups[ticket]

    async def _connect(self, origin: Origin, timeouts: ExchangeTimeouts) -> UpstreamConnection:
        """Use a granted slot: open a connection and enter it in the books as in use."""
        try:
            conn = await open_upstream_connection(
                origin,
                ssl_context=self._ssl_context,
                address_allowed=self._address_allowed,
                connect_timeout=timeouts.connect,
                max_head_bytes=self._max_head_bytes,
            )
        except BaseException:
            await self._apply(self._books.connect_failed(origin))
            raise
        self._opened += 1
        await self._apply(self._books.connected(origin, conn))
        if conn.closed:
            raise PoolClosedError("the upstream connection pool is closed")
        return conn

    async def _discard(self, conn: UpstreamConnection) -> None:
        await self._apply(self._books.release(conn, trio.current_time(), reusable=False))

    async def _apply(self, step: Step[UpstreamConnection]) -> None:
        """Carry out a bookkeeping step: wake the granted waiters, then close connections (bounded shield)."""
        for ticket in step.woken:
            event = self._wakeups.get(ticket)
            if event is not None:  # absent: its holder has not started waiting and will see the grant
                event.set()
        if step.to_close:
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                for conn in step.to_close:
                    await conn.aclose()
