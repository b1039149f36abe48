"""A worker's side of its channel to the supervisor (``serve --workers N``; the other side is
:mod:`trioproxy.coordinator`).

* :class:`SupervisorLink` owns the channel, answers the supervisor's ``report`` calls from the reporters the
  gateway registers (metrics, balancer status, data-plane state), and asks the supervisor to ``gather`` every
  worker's report for the admin plane.
* :class:`SupervisorLimits` is the limiter's shared backend when there is no Redis: the same interface as
  :class:`~trioproxy.limits.redis_backend.RedisBackend`, so :class:`~trioproxy.limits.Admission` treats the
  supervisor exactly as it treats Redis (deadlines, queued settlements, the outage policy).
* :class:`LinkedKeyStates` shares this worker's provider key state changes with the other workers.

Resource handling: :meth:`SupervisorLink.run` runs the channel in the gateway's service nursery; the inherited
socket is closed when it ends.

Error handling: a call to a supervisor that is gone or slow raises :class:`~trioproxy.ipc.ChannelClosed` or
``trio.TooSlowError`` (the admission's outage policy handles them); a worker whose supervisor is gone stops by
itself (:mod:`trioproxy.workers`).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import trio

from trioproxy.balancer.balancer import Balancer
from trioproxy.balancer.health import Transition
from trioproxy.balancer.state_sync import adopt_fields, transition_fields
from trioproxy.ipc import Channel, ChannelClosed, RemoteError
from trioproxy.limits.model import Answer, Check, Plan, Reservation
from trioproxy.snapshot import Snapshot

logger = logging.getLogger(__name__)

# Notes the supervisor sends on its own, which may arrive before the worker registered their handler.
HELD_NOTES = ("key_state", "key_states")
MAX_HELD_NOTES = 10_000
# Gathering the group's reports: the supervisor allows each worker 2 s, this bounds the whole.
GATHER_TIMEOUT = 5.0
# How often key states received for keys this worker did not know yet are offered again (its snapshot may
# have caught up since).
KEY_STATE_RETRY_INTERVAL = 1.0


class SupervisorLink:
    """This worker's channel to its supervisor; see the module docstring."""

    def __init__(self, fd: int, worker_index: int) -> None:
        self.worker_index = worker_index
        self._fd = fd
        self._handlers: dict[str, Callable[..., Any]] = {}
        # Notes the supervisor may send before their consumer exists (the key state table is sent as soon as a
        # worker connects, before its balancer is built): held until :meth:`handle` registers one.
        self._held: dict[str, list[tuple[Any, ...]]] = {}
        for method in HELD_NOTES:
            self._handlers[method] = functools.partial(self._hold, method)
        self._reporters: dict[str, Callable[[], Any]] = {}
        self._channel: Channel | None = None

    def __repr__(self) -> str:
        return f"<SupervisorLink worker={self.worker_index} {self._channel!r}>"

    def handle(self, method: str, handler: Callable[..., Any]) -> None:
        """Answer the supervisor's ``method`` (synchronously, in arrival order), from now on; notes of
        :data:`HELD_NOTES` that arrived before are handed over first, in order."""
        for args in self._held.pop(method, []):
            handler(*args)
        self._handlers[method] = handler

    def _hold(self, method: str, *args: Any) -> None:
        held = self._held.setdefault(method, [])
        if len(held) < MAX_HELD_NOTES:
            held.append(args)

    def add_reporter(self, kind: str, reporter: Callable[[], Any]) -> None:
        """Answer the supervisor's ``report`` of ``kind`` with ``reporter()`` (a picklable value)."""
        self._reporters[kind] = reporter

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the channel until the supervisor closes it or this task is cancelled."""
        sock = socket.socket(fileno=self._fd)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._channel = Channel(
            stream,
            f"worker {self.worker_index}/supervisor",
            handlers=self._handlers,
            async_handlers={"report": self._report},
        )
        task_status.started()
        await self._channel.run()
        logger.warning("the channel to the supervisor is closed")

    async def _report(self, kind: str) -> Any:
        reporter = self._reporters.get(kind)
        if reporter is None:
            raise LookupError(f"no {kind!r} report in this worker")
        return reporter()

    async def call(self, method: str, *args: Any) -> Any:
        """Call the supervisor (the caller bounds the wait)."""
        if self._channel is None:
            raise ChannelClosed("the channel to the supervisor is not running")
        return await self._channel.call(method, *args)

    def notify(self, method: str, *args: Any) -> bool:
        """Queue a note for the supervisor; False when it was dropped (the channel is closed)."""
        if self._channel is None:
            raise ChannelClosed("the channel to the supervisor is not running")
        return self._channel.notify(method, *args)

    async def gather(self, kind: str) -> list[Any]:
        """Every live worker's report of ``kind`` (this one's included), by worker index."""
        with trio.fail_after(GATHER_TIMEOUT):
            reports: list[Any] = await self.call("gather", kind)
        return reports


class SupervisorLimits:
    """The limiter's shared backend in a worker group without Redis: counters kept by the supervisor."""

    name = "supervisor"
    description = "the supervisor"
    errors: tuple[type[BaseException], ...] = (ChannelClosed, trio.TooSlowError)
    refusal: tuple[type[BaseException], ...] = (RemoteError,)

    def __init__(self, link: SupervisorLink) -> None:
        self._link = link

    def __repr__(self) -> str:
        return f"<SupervisorLimits {self._link!r}>"

    async def reserve(self, plan: Plan) -> Answer:
        answer: Answer = await self._link.call("reserve", plan)
        return answer

    async def settle(self, reservation: Reservation, actual_tokens: int, actual_cost_nano: int) -> bool:
        """Apply the actual usage; False when this reservation was settled before."""
        applied: bool = await self._link.call("settle", reservation, actual_tokens, actual_cost_nano)
        return applied

    async def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None:
        await self._link.call("seed", list(items), now)

    async def used(self, checks: Sequence[Check], now: float) -> list[int | None]:
        values: list[int | None] = await self._link.call("used", list(checks), now)
        return values


class LinkedKeyStates:
    """Shares provider key states between the workers of a group, through the supervisor.

    What is shared, and when another worker adopts it, is :mod:`trioproxy.balancer.state_sync` (the same as
    between instances through Redis). States received for a key not in this worker's snapshot yet are kept and
    offered again once its snapshot has more keys."""

    def __init__(
        self,
        balancer: Balancer,
        link: SupervisorLink,
        current_snapshot: Callable[[], Snapshot],
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._balancer = balancer
        self._link = link
        self._current_snapshot = current_snapshot
        # Unique per run: a restarted worker keeps its index, and must adopt what its predecessor decided.
        self._origin = f"worker-{link.worker_index}-{uuid.uuid4().hex[:12]}"
        self._wall_clock = wall_clock
        self._received: dict[int, dict[str, str]] = {}
        self._known: frozenset[int] = frozenset()
        self.published = 0
        self.applied = 0
        link.handle("key_state", self._adopt)
        link.handle("key_states", self._adopt_all)
        balancer.subscribe(self._on_transition)

    def __repr__(self) -> str:
        return f"<LinkedKeyStates {self._origin} published={self.published} applied={self.applied}>"

    def _on_transition(self, transition: Transition) -> None:
        fields = transition_fields(self._balancer, transition, self._origin)
        if fields is None:
            return
        try:
            sent = self._link.notify("key_state", transition.key_id, fields)
        except ChannelClosed:
            return  # the supervisor is gone: this worker stops soon
        self.published += sent

    def _adopt(self, key_id: int, fields: dict[str, str]) -> None:
        self._received[key_id] = fields
        # A worker that has not served the key's pool yet knows the key only once it follows the snapshot.
        self._balancer.follow(self._current_snapshot(), now=trio.current_time())
        self.applied += adopt_fields(
            self._balancer,
            key_id,
            fields,
            origin=self._origin,
            wall_now=self._wall_clock(),
            now=trio.current_time(),
        )

    def _adopt_all(self, states: dict[int, dict[str, str]]) -> None:
        for key_id, fields in states.items():
            self._adopt(key_id, fields)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Offer received states again whenever the snapshot brought keys this worker did not know."""
        task_status.started()
        while True:
            await trio.sleep(KEY_STATE_RETRY_INTERVAL)
            self._balancer.follow(self._current_snapshot(), now=trio.current_time())
            known = frozenset(self._balancer.key_ids())
            if known != self._known:
                self._known = known
                for key_id in known & self._received.keys():
                    self._adopt(key_id, self._received[key_id])
