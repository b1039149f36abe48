"""The supervisor's shared state for its workers: exact limits, key states, and the group's reports.

``serve --workers N`` runs N data-plane processes. Without Redis, they still must act as one gateway:

* **Limits** stay exact across workers: the counters live here, in one :class:`~trioproxy.limits.local.LocalBackend`
  of the supervisor, and every worker's admission reserves and settles on them through its channel
  (:class:`trioproxy.worker_link.SupervisorLimits`). A request of a key without limits never comes here.
* **Provider key states** (a key ejected, cooling down, invalid, reset by an admin) that one worker decides are
  sent here as a note and passed on to every other worker, which adopts the state when it is newer than its own
  (the same rule and fields as the Redis sharing, :mod:`trioproxy.balancer.state_sync`). A worker that (re)starts
  gets the whole table first.
* **The database**: a worker's data plane loads its snapshots, writes its request rows and reads the spend that
  starts a limit counter through here (:mod:`trioproxy.supervisor_store`), so workers need no database code.
* **Reports**: the admin plane (in worker 0) asks here for every worker's metrics, balancer status or data-plane
  state, and merges them (:mod:`trioproxy.worker_reports`), so ``/metrics`` and the status pages show the group.

With Redis configured, Redis holds the limits and key states (the same code as for several hosts); the channels
then carry reports only.

Resource handling: one :class:`~trioproxy.ipc.Channel` per live worker, run by that worker's keeper task in the
supervisor (:meth:`Coordinator.serve_worker`); it ends when the worker exits.

Error handling: a worker that does not answer a report within :data:`REPORT_TIMEOUT` is left out of that report
(logged); limit calls that fail reach the worker as errors, where its admission applies the outage policy.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from trioproxy.ipc import Channel, ChannelClosed, RemoteError
from trioproxy.limits.local import LocalBackend
from trioproxy.limits.model import Answer, Check, Plan, Reservation
from trioproxy.supervisor_store import SupervisorStore

logger = logging.getLogger(__name__)

# How long one worker may take to produce its report (metrics, balancer status) for the admin plane.
REPORT_TIMEOUT = 2.0
# Settled reservation ids are remembered this long past their lease (a settlement retried after a lost reply
# must count once), and swept when there are more than SETTLED_SWEEP_AT of them.
SETTLED_GRACE = 60.0
SETTLED_SWEEP_AT = 10_000


class Coordinator:
    """Shared state of one worker group; see the module docstring."""

    def __init__(
        self,
        store: SupervisorStore | None = None,
        *,
        instances: int = 1,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        # The database for the workers' data planes (None: they open their own; tests of the other parts).
        self.store = store
        # Exact for this instance's workers; ``instances`` instances without Redis each hold their share.
        self.limits = LocalBackend("supervisor", divisor=instances)
        self._wall_clock = wall_clock
        self._settled: dict[str, float] = {}  # reservation id -> when to forget it
        self._key_states: dict[int, dict[str, str]] = {}
        self._channels: dict[int, Channel] = {}

    def __repr__(self) -> str:
        return f"<Coordinator workers={sorted(self._channels)} {self.limits!r} key_states={len(self._key_states)}>"

    async def serve_worker(self, index: int, sock: socket.socket) -> None:
        """Serve worker ``index`` on the supervisor's end of its socket pair until the worker exits."""
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        channel = Channel(
            stream,
            f"supervisor/worker {index}",
            handlers={
                "reserve": self.reserve,
                "settle": self.settle,
                "seed": self.seed,
                "used": self.used,
                "key_state": lambda key_id, fields: self.key_state(index, key_id, fields),
            },
            async_handlers={
                "gather": self.gather,
                **(self.store.handlers() if self.store is not None else {}),
            },
        )
        if self._key_states:
            channel.notify("key_states", dict(self._key_states))
        self._channels[index] = channel
        try:
            await channel.run()
        finally:
            if self._channels.get(index) is channel:
                del self._channels[index]

    # -- limits (synchronous: a plan is atomic because nothing here awaits) -------------------------------------

    def reserve(self, plan: Plan) -> Answer:
        return self.limits.reserve(plan)

    def settle(self, reservation: Reservation, actual_tokens: int, actual_cost_nano: int) -> bool:
        """Apply a settlement once; False for a reservation settled before (a retry after a lost reply)."""
        if reservation.rid in self._settled:
            return False
        self._sweep_settled()
        self._settled[reservation.rid] = reservation.lease_until + SETTLED_GRACE
        self.limits.settle(reservation, actual_tokens, actual_cost_nano)
        return True

    def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None:
        for check, value in items:
            self.limits.seed(check, value)

    def used(self, checks: Sequence[Check], now: float) -> list[int | None]:
        return [self.limits.used(check, now) for check in checks]

    def _sweep_settled(self) -> None:
        if len(self._settled) < SETTLED_SWEEP_AT:
            return
        now = self._wall_clock()
        for rid in [rid for rid, until in self._settled.items() if until <= now]:
            del self._settled[rid]

    # -- key states ----------------------------------------------------------------------------------------------

    def key_state(self, origin: int, key_id: int, fields: dict[str, str]) -> None:
        """A worker decided a key's state: keep it for workers that start later and pass it to the others."""
        self._key_states[key_id] = fields
        for index, channel in self._channels.items():
            if index != origin:
                channel.notify("key_state", key_id, fields)

    # -- reports -------------------------------------------------------------------------------------------------

    async def gather(self, kind: str) -> list[Any]:
        """Every live worker's report of ``kind``, by worker index; a worker that fails to answer is left out."""
        channels = sorted(self._channels.items())
        reports: list[tuple[int, Any]] = []

        async def ask(index: int, channel: Channel) -> None:
            try:
                with trio.fail_after(REPORT_TIMEOUT):
                    reports.append((index, await channel.call("report", kind)))
            except (ChannelClosed, RemoteError, trio.TooSlowError) as exc:
                logger.warning("worker %d did not report %s: %s", index, kind, type(exc).__name__)

        async with trio.open_nursery() as nursery:
            for index, channel in channels:
                nursery.start_soon(ask, index, channel)
        return [report for _, report in sorted(reports, key=lambda item: item[0])]
