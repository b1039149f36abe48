"""Keeps the data plane's configuration snapshot current.

The store bumps a config version on every configuration write (CLI, admin API, another instance). The reloader
polls that one cheap value and, when it moved, builds a fresh :class:`~trioproxy.snapshot.Snapshot` in a worker
thread and swaps it into the :class:`SnapshotHolder` with one assignment. Requests read ``holder.current`` once when
they start, so a swap never changes a request in flight. A failed reload keeps the previous snapshot and is retried
at the next poll: a broken database never takes the data plane down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from trioproxy.snapshot import Snapshot

logger = logging.getLogger(__name__)


class SnapshotHolder:
    """The current snapshot; swapped atomically by the reloader, read by every request."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    def __repr__(self) -> str:
        return f"<SnapshotHolder version={self.current.version}>"


class ConfigReloader:
    """Polls the config version and reloads the snapshot when it changed.

    Resource handling: the database work runs in worker threads through one capacity limiter of its own, so a slow
    database can never queue more than one reload at a time.
    """

    def __init__(
        self,
        read_version: Callable[[], int],
        load_snapshot: Callable[[], Snapshot],
        *,
        poll_interval: float,
        load_timeout: float = 30.0,
    ) -> None:
        self._read_version = read_version
        self._load_snapshot = load_snapshot
        self._poll_interval = poll_interval
        self._load_timeout = load_timeout
        self._limiter = trio.CapacityLimiter(1)
        self.holder: SnapshotHolder | None = None
        self.reloads = 0
        self.failures = 0

    async def load_initial(self) -> SnapshotHolder:
        """Load the first snapshot; errors propagate (a gateway without configuration must not start)."""
        with trio.fail_after(self._load_timeout):
            snapshot = await trio.to_thread.run_sync(self._load_snapshot, limiter=self._limiter)
        self.holder = SnapshotHolder(snapshot)
        return self.holder

    async def run(self, *, task_status: trio.TaskStatus[SnapshotHolder] = trio.TASK_STATUS_IGNORED) -> None:
        holder = self.holder or await self.load_initial()
        task_status.started(holder)
        while True:
            await trio.sleep(self._poll_interval)
            await self.poll_once(holder)

    async def poll_once(self, holder: SnapshotHolder) -> bool:
        """One poll: returns True when a new snapshot was swapped in."""
        try:
            with trio.fail_after(self._load_timeout):
                version = await trio.to_thread.run_sync(self._read_version, limiter=self._limiter)
                if version == holder.current.version:
                    return False
                snapshot = await trio.to_thread.run_sync(self._load_snapshot, limiter=self._limiter)
        except Exception as exc:  # keep serving the old snapshot (TooSlowError included)
            self.failures += 1
            logger.warning("config reload failed, keeping version %s: %s", holder.current.version, exc)
            return False
        holder.current = snapshot
        self.reloads += 1
        logger.info("configuration version %s is live", snapshot.version)
        return True
