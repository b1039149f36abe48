"""The database as the workers of a group reach it: through their supervisor.

A worker of ``serve --workers N`` never opens the database itself (worker 0 does, for its admin plane only). Its
data plane needs four things from the store, and asks the supervisor for each over its channel:

* ``config_version`` and ``snapshot``: what the config reloader polls and loads. The supervisor loads a snapshot
  once per config version and hands the same one to every worker that asks (pickled), so N workers cost one
  load, not N;
* ``insert_records``: the metering writer's batches. The supervisor is then the only process that writes request
  rows, one batch at a time, which is what SQLite wants;
* ``spend``: the sums that start a limit counter (:mod:`trioproxy.limits.seed`).

So a worker loads neither SQLAlchemy, nor a database driver, nor the key decryption (``cryptography``): about
35 MB less per worker (docs/BENCHMARKS.md).

Both halves are here: :class:`SupervisorStore` answers in the supervisor; :func:`worker_sources` gives a worker
the blocking callables its reloader, metering writer and limiter take (they call them in worker threads, as they
call the database in a single process); each hops back into trio with ``trio.from_thread.run`` to make its call.

Error handling: a failed call raises in the worker's thread like a database error would, so the consumers' own
handling applies unchanged: the reloader keeps its snapshot and retries, the metering writer spools the batch,
the limiter refuses with 503 what it cannot seed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from trioproxy.limits.seed import SpendQuery
from trioproxy.records import RequestRecord
from trioproxy.snapshot import Snapshot

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from trioproxy.crypto import SecretBox
    from trioproxy.settings import UpstreamSettings
    from trioproxy.worker_link import SupervisorLink

logger = logging.getLogger(__name__)

# A worker's deadline for each call; the consumers have their own, longer ones around the whole operation.
CALL_TIMEOUT = 30.0
# Database reads running at once in the supervisor (snapshot loads, version polls, spend sums).
READ_THREADS = 2


class SupervisorStore:
    """The supervisor's side: answers the workers' store calls from its own engine."""

    def __init__(self, engine: Engine, box: SecretBox, upstream: UpstreamSettings) -> None:
        self._engine = engine
        self._box = box
        self._upstream = upstream
        self._reads = trio.CapacityLimiter(READ_THREADS)
        self._writes = trio.CapacityLimiter(1)  # one writer of request rows for the whole group
        self._loading = trio.Lock()
        self._snapshot: Snapshot | None = None
        self.loads = 0
        self.written = 0

    def __repr__(self) -> str:
        version = None if self._snapshot is None else self._snapshot.version
        return f"<SupervisorStore snapshot={version} loads={self.loads} written={self.written}>"

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The channel's async handlers for these calls."""
        return {
            "config_version": self.config_version,
            "snapshot": self.snapshot,
            "insert_records": self.insert_records,
            "spend": self.spend,
        }

    async def config_version(self) -> int:
        from trioproxy.store.snapshot_loader import read_config_version

        version: int = await trio.to_thread.run_sync(read_config_version, self._engine, limiter=self._reads)
        return version

    async def snapshot(self) -> Snapshot:
        """The snapshot of the current config version, loaded once per version for all workers."""
        async with self._loading:
            current = await self.config_version()
            if self._snapshot is None or self._snapshot.version != current:
                from trioproxy.store.snapshot_loader import load_snapshot

                load = functools.partial(load_snapshot, self._engine, self._box, self._upstream)
                self._snapshot = await trio.to_thread.run_sync(load, limiter=self._reads)
                self.loads += 1
            return self._snapshot

    async def insert_records(self, records: Sequence[RequestRecord]) -> int:
        from trioproxy.store.request_log import insert_request_records

        stored: int = await trio.to_thread.run_sync(
            insert_request_records, self._engine, records, limiter=self._writes
        )
        self.written += stored
        return stored

    async def spend(self, queries: Sequence[SpendQuery]) -> list[int]:
        from trioproxy.store.spend import database_spend

        values: list[int] = await trio.to_thread.run_sync(
            database_spend, self._engine, queries, limiter=self._reads
        )
        return values


@dataclass(frozen=True)
class StoreSources:
    """The blocking store callables a gateway process runs on (in worker threads)."""

    read_version: Callable[[], int]
    load_snapshot: Callable[[], Snapshot]
    insert_records: Callable[[Sequence[RequestRecord]], int]
    spend: Callable[[Sequence[SpendQuery]], list[int]]


def worker_sources(link: SupervisorLink) -> StoreSources:
    """A worker's store: every call goes to the supervisor (see the module docstring)."""

    def call(method: str, *args: Any) -> Any:
        return trio.from_thread.run(_call, link, method, *args)

    return StoreSources(
        read_version=functools.partial(call, "config_version"),
        load_snapshot=functools.partial(call, "snapshot"),
        insert_records=functools.partial(call, "insert_records"),
        spend=functools.partial(call, "spend"),
    )


async def _call(link: SupervisorLink, method: str, *args: Any) -> Any:
    with trio.fail_after(CALL_TIMEOUT):
        return await link.call(method, *args)


def database_sources(engine: Engine, box: SecretBox, upstream: UpstreamSettings) -> StoreSources:
    """A single process's store: its own engine."""
    from trioproxy.store.request_log import insert_request_records
    from trioproxy.store.snapshot_loader import load_snapshot, read_config_version
    from trioproxy.store.spend import database_spend

    return StoreSources(
        read_version=functools.partial(read_config_version, engine),
        load_snapshot=functools.partial(load_snapshot, engine, box, upstream),
        insert_records=functools.partial(insert_request_records, engine),
        spend=functools.partial(database_spend, engine),
    )
