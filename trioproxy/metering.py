"""The metering writer: request records from the proxy into the database, never waiting, never losing one.

Data flow::

    proxy task --submit()--> bounded memory channel --run()--> write_batch (worker thread) --> database
                   |  (full, or closing)                 |  (write failed / DB known down)
                   +-----------> spool file <------------+
                                     |
                                     +--run() replays it, truncates it once all of it is committed

Ledger semantics (reliability plan §3.2): at-least-once capture, exactly-once effect. A record lives in
exactly one of: the channel, the batch being written, the spool. It leaves the batch or the spool only after
``write_batch`` returned (the commit was acknowledged); ``write_batch`` is idempotent by ``request_id``, so
the cases where a record is written twice (a replay after a crash before the spool was truncated; a batch
whose thread was abandoned on cancellation and also spooled) store it once.

Crash window: the spool is not a write-ahead log (the hot path never touches the disk). A process killed
without a shutdown (``kill -9``, OOM) loses what was in memory: the channel and the batch being written, about
``flush_interval`` plus one write's worth of records when the database keeps up. Spooled records survive a
process crash (page cache) at once, and a power loss once fsynced (every loop iteration, and on shutdown).

While the database is down, the writer does not hammer it: the first failure marks it unavailable, live
batches go straight to the spool, and one spool batch is retried every ``retry_interval``; the first success
resumes normal writing and the backlog is replayed between live batches.

Resource handling: :meth:`MeteringWriter.run` is the only task; start it with ``nursery.start``. It owns the
spool's descriptor while it runs (records submitted after it stopped are appended and fsynced by ``submit``
itself). Database calls run in a worker thread under the writer's own ``CapacityLimiter(1)``, so there is
never more than one, even when a cancelled call's thread is still finishing.

Error handling: database errors never leave the writer; they are logged by class name only (driver messages
can carry a DSN) and visible in :attr:`MeteringWriter.stats`. A record that can be neither queued nor spooled
(the spool's disk failed) is logged and counted as ``lost``. Cancellation of ``run`` saves the channel and the
current batch to the spool synchronously (write and fsync, no checkpoint), then propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from trioproxy.records import RequestRecord
from trioproxy.settings import MeteringSettings
from trioproxy.spool import Spool, SpoolError

logger = logging.getLogger(__name__)

WriteBatch = Callable[[Sequence[RequestRecord]], int]
"""Store records (sync, runs in a worker thread); idempotent by ``request_id``; returns the rows newly stored;
raises on any database failure."""

# How long flush_and_close waits for run() to save its queue after cancelling it (the save is synchronous).
SAVE_GRACE = 5.0
# A database write that takes longer is treated as failed (its batch is spooled); the thread keeps the limiter
# until it returns, so a hung database cannot get a second concurrent write.
DEFAULT_WRITE_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class MeteringStats:
    """A snapshot of the writer's counters (cumulative, except ``queued`` and ``spool_bytes``)."""

    queued: int  # records in memory: the channel plus the batch being written
    written: int  # rows the database reported as newly stored (sum of write_batch's return values)
    spooled: int  # records appended to the spool file
    failed_batches: int  # database writes that raised or timed out
    last_error: str | None  # class name of the last database error (never its message)
    spool_bytes: int  # current size of the spool file (0 once everything in it was committed)
    lost: int  # records that could be neither queued nor spooled


class MeteringWriter:
    """Collects :class:`RequestRecord` from the proxy and writes them to the database in batches."""

    def __init__(
        self,
        settings: MeteringSettings,
        spool_path: Path,
        write_batch: WriteBatch,
        *,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._write_batch = write_batch
        self._write_timeout = write_timeout
        self._spool = Spool(spool_path)
        self._send, self._receive = trio.open_memory_channel[RequestRecord](settings.queue_size)
        self._db_limiter = trio.CapacityLimiter(1)
        self._run_scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._inflight: list[RequestRecord] = []  # taken from the channel, not yet committed
        self._accepting = True  # submit() may use the channel
        self._started = False
        self._running = False  # run() owns the spool (it fsyncs and closes it)
        self._channel_closed = False
        self._healthy = True  # the last database write succeeded
        self._next_retry = 0.0  # trio time of the next attempt while not healthy
        self._offset = 0  # spool bytes already committed
        self._written = 0
        self._spooled = 0
        self._failed_batches = 0
        self._last_error: str | None = None
        self._lost = 0

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<MeteringWriter queued={s.queued} written={s.written} spooled={s.spooled} "
            f"failed_batches={s.failed_batches} spool_bytes={s.spool_bytes}>"
        )

    @property
    def stats(self) -> MeteringStats:
        return MeteringStats(
            queued=self._receive.statistics().current_buffer_used + len(self._inflight),
            written=self._written,
            spooled=self._spooled,
            failed_batches=self._failed_batches,
            last_error=self._last_error,
            spool_bytes=self._spool.size,
            lost=self._lost,
        )

    def submit(self, record: RequestRecord) -> None:
        """Hand ``record`` to the writer; never blocks, never raises. Call it from the Trio thread.

        Safe in a ``finally`` of a task being cancelled (no checkpoint). When the queue is full, or the writer
        is closing, the record is appended to the spool instead.
        """
        if self._accepting:
            try:
                self._send.send_nowait(record)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # full (overload or a database outage): the spool takes it
            else:
                return
        if self._spill([record]) and not self._running:
            # No writer will fsync or close the spool for us any more (or yet).
            self._sync_and_close_spool()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batch writer: replay the spool, then write batches until closed or cancelled.

        Raises :class:`~trioproxy.spool.SpoolError` before ``started`` when another process holds the spool.
        """
        if self._started:
            raise RuntimeError("MeteringWriter.run() can be started only once")
        self._started = True
        self._running = True
        try:
            self._spool.open()
            task_status.started()
            with self._run_scope:
                await self._loop()
        finally:
            self._accepting = False
            try:
                self._save_leftovers()
            finally:
                self._running = False
                self._stopped.set()
                s = self.stats
                logger.info(
                    "metering writer stopped: %d rows written, %d records spooled, %d bytes in the spool",
                    s.written,
                    s.spooled,
                    s.spool_bytes,
                )

    # The timeout is part of the contract (app.py passes its shutdown budget), not a cancellation substitute.
    async def flush_and_close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop queueing, write what is queued within ``timeout``, leave the rest in the (fsynced) spool.

        Records submitted from now on go to the spool. When ``timeout`` expires, ``run`` is cancelled, which
        saves its queue to the spool before it returns.
        """
        self._accepting = False
        self._send.close()
        if not self._started:
            # No writer ran: what was queued goes to the spool for the next start.
            self._spill(self._drain_channel())
            self._sync_and_close_spool()
            return
        with trio.move_on_after(timeout):
            await self._stopped.wait()
        if not self._stopped.is_set():
            logger.warning("metering flush did not finish in %.1f s; the rest stays in the spool", timeout)
            self._run_scope.cancel()
            with trio.move_on_after(SAVE_GRACE):
                await self._stopped.wait()

    async def _loop(self) -> None:
        while True:
            await self._collect()
            if self._inflight:
                await self._write_inflight()
            if self._channel_closed:
                break
            try:
                if self._replay_due():
                    await self._replay_step()
                if self._spool.dirty:
                    await trio.to_thread.run_sync(self._spool.sync)
            except OSError as exc:
                # The spool's disk failed; the database may still work, so keep writing live batches.
                logger.error("metering spool I/O failed (%s)", type(exc).__name__)
                await trio.sleep(self._settings.retry_interval)
        # Closing: the channel is empty. Replay the spool while the database answers (flush_and_close's
        # timeout bounds this; cancelling it loses nothing, the spool is only truncated after commits).
        try:
            while self._healthy and self._spool.size > self._offset:
                await self._replay_step()
        except OSError as exc:
            logger.error("metering spool I/O failed (%s)", type(exc).__name__)

    def _replay_due(self) -> bool:
        if self._spool.size <= self._offset:
            return False
        return self._healthy or trio.current_time() >= self._next_retry

    async def _collect(self) -> None:
        """Fill ``_inflight`` up to ``batch_size``, waiting ``flush_interval`` at most after the first one."""
        batch_size = self._settings.batch_size
        self._take_nowait(batch_size)
        if self._channel_closed or len(self._inflight) >= batch_size or self._replay_due():
            return  # full, closing, or the spool has work now: no waiting
        if not self._inflight:
            if self._healthy or self._spool.size <= self._offset:
                idle = max(self._settings.retry_interval, self._settings.flush_interval)
            else:
                idle = self._next_retry - trio.current_time()  # wake up for the next spool retry
            with trio.move_on_after(idle):
                await self._receive_one()
            if not self._inflight:
                return
        with trio.move_on_after(self._settings.flush_interval):
            while len(self._inflight) < batch_size and not self._channel_closed:
                await self._receive_one()

    async def _receive_one(self) -> None:
        try:
            # Memory channels are cancel-safe: a cancelled receive has taken nothing.
            self._inflight.append(await self._receive.receive())
        except trio.EndOfChannel:
            self._channel_closed = True

    def _take_nowait(self, limit: int) -> None:
        while len(self._inflight) < limit:
            try:
                self._inflight.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return
            except trio.EndOfChannel:
                self._channel_closed = True
                return

    def _drain_channel(self) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        while True:
            try:
                records.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return records

    async def _write_inflight(self) -> None:
        if not self._healthy and trio.current_time() < self._next_retry:
            self._spill_inflight()  # the database is known to be down: do not wait on it
            return
        try:
            await self._write(tuple(self._inflight))
        except Exception as exc:
            self._record_failure(exc)
            self._spill_inflight()
        else:
            self._inflight = []

    def _spill_inflight(self) -> None:
        batch, self._inflight = self._inflight, []
        self._spill(batch)

    async def _replay_step(self) -> None:
        """Write one batch from the spool; truncate the spool when all of it is committed."""
        chunk = await trio.to_thread.run_sync(
            self._spool.read, self._offset, self._spool.size, self._settings.batch_size
        )
        if chunk.records:
            try:
                await self._write(chunk.records)
            except Exception as exc:
                self._record_failure(exc)
                return
        self._offset = chunk.next_offset
        if self._offset >= self._spool.size:
            self._spool.truncate()
            self._offset = 0

    async def _write(self, records: Sequence[RequestRecord]) -> None:
        # abandon_on_cancel: a cancelled run() returns promptly; the batch is still in _inflight or the spool,
        # and if the abandoned thread commits it anyway, the idempotent insert absorbs the second write.
        with trio.fail_after(self._write_timeout):
            stored = await trio.to_thread.run_sync(
                self._write_batch, records, limiter=self._db_limiter, abandon_on_cancel=True
            )
        self._written += stored
        if not self._healthy:
            logger.info("metering database is reachable again; replaying %d spooled bytes", self._spool.size)
            self._healthy = True

    def _record_failure(self, exc: Exception) -> None:
        self._failed_batches += 1
        self._last_error = type(exc).__name__
        self._next_retry = trio.current_time() + self._settings.retry_interval
        if self._healthy:
            logger.warning(
                "metering database write failed (%s); rows go to the spool, retrying every %.1f s",
                self._last_error,
                self._settings.retry_interval,
            )
        else:
            logger.debug("metering database still unavailable (%s)", self._last_error)
        self._healthy = False

    def _spill(self, records: Sequence[RequestRecord]) -> bool:
        """Append ``records`` to the spool (no fsync); False when some could not be stored."""
        if not records:
            return True
        try:
            self._spool.append(records)
        except (TypeError, ValueError):  # json.dumps: a value the format cannot hold
            if len(records) == 1:
                self._count_lost(records, "a field value the spool cannot hold")
                return False
            # Isolate the malformed record instead of losing its whole batch.
            return all([self._spill([record]) for record in records])
        except (OSError, SpoolError) as exc:
            self._count_lost(records, type(exc).__name__)
            return False
        self._spooled += len(records)
        return True

    def _count_lost(self, records: Sequence[RequestRecord], reason: str) -> None:
        self._lost += len(records)
        logger.error("could not spool %d metering records (%s): they are lost", len(records), reason)

    def _sync_and_close_spool(self) -> None:
        try:
            self._spool.sync()
        except OSError as exc:
            logger.error("could not fsync the metering spool (%s)", type(exc).__name__)
        self._spool.close()

    def _save_leftovers(self) -> None:
        """Spool the channel and the current batch, fsync, release the spool (run()'s exit path).

        Synchronous on purpose: with no checkpoint, a cancellation cannot interrupt it, so it needs no shield.
        The fsync blocks the event loop once, at shutdown; a worker thread under a deadline would let a mock
        clock (or a stalled disk) abandon it and leave the spool locked.
        """
        leftovers = [*self._inflight, *self._drain_channel()]
        self._inflight = []
        self._spill(leftovers)
        self._sync_and_close_spool()
