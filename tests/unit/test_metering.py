"""MeteringWriter: batching, outages, overload, shutdown and cancellation, with nothing lost or stored twice.

Sinks are plain callables run in the writer's worker thread: an in-memory table with a primary key (with
failure injection) and a real SQLite database built here with the sqlite3 module.

Timing under the autojump clock: the clock jumps to the next deadline whenever the run loop is idle, *also*
while a worker thread runs. So a test that asserts virtual times waits on events the sink sends from its
thread (never on a trio deadline of its own while a write is in flight), writers get ``write_timeout=inf``,
and ``flush_and_close`` (a deadline) is called with the writer idle (:func:`close_idle`) or on the real clock.
Hangs are caught by a real-time watchdog thread instead of a trio deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from tests.unit.test_spool import sample_record
from trioproxy.metering import MeteringWriter
from trioproxy.records import RequestRecord
from trioproxy.settings import MeteringSettings
from trioproxy.spool import RecordCodec, SpoolError

SECRET = "hunter2"
T = TypeVar("T")


@contextlib.contextmanager
def real_time_limit(seconds: float = 10.0) -> Iterator[None]:
    """Fail the test if the body takes longer than ``seconds`` of wall time (immune to the mock clock)."""
    token = trio.lowlevel.current_trio_token()
    scope = trio.CancelScope()

    def fire() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(scope.cancel)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        with scope:
            yield
    finally:
        timer.cancel()
    if scope.cancelled_caught:
        pytest.fail(f"not done after {seconds} s of real time")


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll in small virtual steps, for conditions no sink event announces (no timing asserted)."""
    with real_time_limit():
        # Polling on purpose: the writer's internal state has no event to wait on.
        while not predicate():
            await trio.sleep(0.01)


async def close_idle(writer: MeteringWriter) -> None:
    """flush_and_close once no write is in flight, so the mock clock cannot jump to its deadline."""
    with real_time_limit():
        await trio.testing.wait_all_threads_completed()
        await writer.flush_and_close(1)
    assert writer.stats.queued == 0


@dataclasses.dataclass
class Call:
    at: float  # virtual time when the write started
    size: int
    ok: bool


class Sink:
    """An in-memory table keyed by request_id (so writes are idempotent), with failure injection."""

    def __init__(self) -> None:
        self.rows: dict[str, RequestRecord] = {}
        self.deliveries: Counter[str] = Counter()  # committed writes per id, duplicates included
        self.calls: list[Call] = []
        self.entered = 0
        self.down = False  # raise before committing
        self.fail_after_commit = 0  # this many calls commit, then raise (a lost acknowledgement)
        self.gate: threading.Event | None = None  # when set up, every call waits for it
        self._changed = trio.Event()

    def __call__(self, records: Sequence[RequestRecord]) -> int:
        started = self._in_trio(trio.current_time)
        now = math.nan if started is None else started
        self.entered += 1
        self._in_trio(self._notify)
        if self.gate is not None:
            assert self.gate.wait(10), "gate never opened"
        if self.down:
            self.calls.append(Call(now, len(records), ok=False))
            self._in_trio(self._notify)
            raise ConnectionRefusedError(f"could not connect to postgresql://metering:{SECRET}@db/trioproxy")
        new = 0
        for record in records:
            self.deliveries[record.request_id] += 1
            if record.request_id not in self.rows:
                self.rows[record.request_id] = record
                new += 1
        self.calls.append(Call(now, len(records), ok=True))
        self._in_trio(self._notify)
        if self.fail_after_commit:
            self.fail_after_commit -= 1
            raise TimeoutError("the commit acknowledgement was lost")
        return new

    def _in_trio(self, fn: Callable[[], T]) -> T | None:
        # A thread the writer abandoned may outlive the test's trio run.
        with contextlib.suppress(trio.RunFinishedError):
            return trio.from_thread.run_sync(fn)
        return None

    def _notify(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with real_time_limit():
            while not predicate():
                self._changed = trio.Event()
                await self._changed.wait()

    @property
    def failed_calls(self) -> list[Call]:
        return [call for call in self.calls if not call.ok]


def make_writer(
    tmp_path: Path, sink: Callable[[Sequence[RequestRecord]], int], **overrides: float
) -> MeteringWriter:
    values: dict[str, float] = {
        "queue_size": 100,
        "batch_size": 10,
        "flush_interval": 5.0,
        "retry_interval": 3.0,
    }
    values.update(overrides)
    settings = MeteringSettings(
        queue_size=int(values["queue_size"]),
        batch_size=int(values["batch_size"]),
        flush_interval=values["flush_interval"],
        retry_interval=values["retry_interval"],
    )
    timeout = values.get("write_timeout", math.inf)
    return MeteringWriter(settings, tmp_path / "metering.spool", sink, write_timeout=timeout)


def spooled_ids(tmp_path: Path) -> list[str]:
    codec = RecordCodec()
    path = tmp_path / "metering.spool"
    return [codec.decode(line).request_id for line in path.read_bytes().splitlines() if line]


def ids(count: int, start: int = 0) -> list[str]:
    return [f"req-{i:04d}" for i in range(start, start + count)]


def submit(writer: MeteringWriter, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        writer.submit(sample_record(i))


# -- batching ----------------------------------------------------------------------------------------------


async def test_batches_by_size_then_by_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Sink()
    writer = make_writer(tmp_path, sink)
    submit(writer, 25)  # queued before the writer starts
    assert writer.stats.queued == 25
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(writer.run)
        await sink.wait_for(lambda: len(sink.rows) == 25)
        assert [(call.at - t0, call.size) for call in sink.calls] == [(0, 10), (0, 10), (5.0, 5)]
        await close_idle(writer)
    stats = writer.stats
    assert (stats.queued, stats.written, stats.spooled, stats.failed_batches, stats.lost) == (0, 25, 0, 0, 0)
    assert stats.last_error is None


async def test_the_interval_counts_from_the_first_record(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Sink()
    writer = make_writer(tmp_path, sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await trio.sleep(17)  # idle: nothing is written, nothing is spooled
        assert sink.calls == []
        t1 = trio.current_time()
        submit(writer, 2)
        await trio.sleep(1)
        submit(writer, 3, start=2)  # joins the open batch, does not restart its timer
        await sink.wait_for(lambda: len(sink.rows) == 5)
        assert [(call.at - t1, call.size) for call in sink.calls] == [(5.0, 5)]
        await close_idle(writer)
    assert not (tmp_path / "metering.spool").read_bytes()


# -- database outages ----------------------------------------------------------------------------------


async def test_database_down_spools_then_writes_every_row_exactly_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink = Sink()
    sink.down = True
    writer = make_writer(tmp_path, sink)
    with caplog.at_level(logging.DEBUG, logger="trioproxy.metering"):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            t0 = trio.current_time()
            submit(writer, 30)
            await sink.wait_for(lambda: len(sink.failed_calls) == 3)
            # One attempt (the first batch is full at once), then one spool batch per retry_interval while the
            # other live batches go straight to the spool: the database is not hammered.
            assert [(call.at - t0, call.size) for call in sink.failed_calls] == [
                (0, 10),
                (3.0, 10),
                (6.0, 10),
            ]
            await eventually(lambda: writer.stats.spooled == 30 and writer.stats.failed_batches >= 3)
            assert sorted(spooled_ids(tmp_path)) == ids(30)
            stats = writer.stats
            assert stats.queued == 0
            assert stats.written == 0
            assert stats.failed_batches >= 3
            assert stats.last_error == "ConnectionRefusedError"

            sink.down = False
            await sink.wait_for(lambda: len(sink.rows) == 30)
            await eventually(lambda: writer.stats.spool_bytes == 0)
            assert (tmp_path / "metering.spool").stat().st_size == 0  # truncated once all of it committed
            await close_idle(writer)
    assert sorted(sink.rows) == ids(30)
    assert set(sink.deliveries.values()) == {1}
    assert writer.stats.written == 30
    assert SECRET not in caplog.text  # the driver's message (with its DSN) is never logged
    assert "ConnectionRefusedError" in caplog.text
    assert "reachable again" in caplog.text


def create_requests_table(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE requests (request_id TEXT PRIMARY KEY, started_at REAL NOT NULL,"
            " status INTEGER NOT NULL, outcome TEXT NOT NULL, input_tokens INTEGER NOT NULL, cost_input TEXT)"
        )


class SqliteSink:
    """The store's contract on real SQLite: one transaction per batch, INSERT ... ON CONFLICT DO NOTHING."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.fail_after_commit = 0

    def __call__(self, records: Sequence[RequestRecord]) -> int:
        # timeout=0: a locked database fails at once (the test's stand-in for "database unavailable").
        with contextlib.closing(sqlite3.connect(self.db, timeout=0)) as conn:
            with conn:
                before = conn.total_changes
                conn.executemany(
                    "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                    [
                        (
                            r.request_id,
                            r.started_at,
                            r.status,
                            r.outcome.value,
                            r.usage.input_tokens,
                            None if r.cost is None else str(r.cost.input),
                        )
                        for r in records
                    ],
                )
                stored = conn.total_changes - before
            if self.fail_after_commit:
                self.fail_after_commit -= 1
                raise sqlite3.OperationalError("disk I/O error")  # after the commit: an ambiguous outcome
            return stored

    def rows(self) -> list[tuple[str, str | None]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute("SELECT request_id, cost_input FROM requests ORDER BY request_id").fetchall()


async def test_sqlite_locked_then_released_every_row_stored_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "usage.db"
    create_requests_table(db)
    sink = SqliteSink(db)
    writer = make_writer(tmp_path, sink)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock (plan D-03)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit(writer, 40)
            await eventually(lambda: writer.stats.spooled == 40 and writer.stats.queued == 0)
            assert writer.stats.last_error == "OperationalError"
            locker.execute("ROLLBACK")
            await eventually(lambda: len(sink.rows()) == 40 and writer.stats.spool_bytes == 0)
            submit(writer, 5, start=40)  # back to normal: straight from the queue
            await eventually(lambda: len(sink.rows()) == 45)
            await close_idle(writer)
    finally:
        locker.close()
    rows = sink.rows()
    assert [request_id for request_id, _ in rows] == ids(45)
    assert {cost for _, cost in rows} == {"0.0000018"}  # the Decimal survived the spool as its exact string
    assert writer.stats.written == 45


async def test_ambiguous_commit_is_replayed_and_stored_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "usage.db"
    create_requests_table(db)
    sink = SqliteSink(db)
    sink.fail_after_commit = 1  # plan D-04: the first batch commits but the writer sees an error
    writer = make_writer(tmp_path, sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        submit(writer, 10)
        await eventually(lambda: writer.stats.failed_batches == 1)
        await eventually(lambda: writer.stats.spool_bytes == 0)  # replayed: the inserts were no-ops
        await close_idle(writer)
    assert [request_id for request_id, _ in sink.rows()] == ids(10)
    assert writer.stats.written == 0  # the replay stored nothing new; the first commit was never acknowledged


async def test_hung_database_write_times_out_and_no_second_write_overlaps(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Sink()
    gate = sink.gate = threading.Event()
    writer = make_writer(tmp_path, sink, write_timeout=30.0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            t0 = trio.current_time()
            submit(writer, 3)
            await eventually(lambda: writer.stats.failed_batches == 1)
            assert trio.current_time() - t0 == pytest.approx(35.0, abs=0.05)  # flush 5 s + timeout 30 s
            assert writer.stats.last_error == "TooSlowError"
            assert sorted(spooled_ids(tmp_path)) == ids(3)
            await trio.sleep(100)  # several retries are due, but the hung thread still holds the limiter
            assert sink.entered == 1
            gate.set()
            await eventually(lambda: writer.stats.spool_bytes == 0 and len(sink.rows) == 3)
            await close_idle(writer)
    finally:
        gate.set()
    assert sorted(sink.rows) == ids(3)


# -- overload, shutdown, cancellation -------------------------------------------------------------------


async def test_full_queue_spills_to_the_spool_and_loses_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Sink()
    gate = sink.gate = threading.Event()
    writer = make_writer(tmp_path, sink, queue_size=5)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit(writer, 1)
            await sink.wait_for(lambda: sink.entered == 1)  # the writer is stuck in a slow write
            submit(writer, 50, start=1)
            stats = writer.stats
            assert (stats.queued, stats.spooled, stats.lost) == (6, 45, 0)  # 1 in the write, 5 queued
            assert spooled_ids(tmp_path) == ids(45, start=6)
            gate.set()
            await sink.wait_for(lambda: len(sink.rows) == 51)
            await eventually(lambda: writer.stats.spool_bytes == 0)
            await close_idle(writer)
    finally:
        gate.set()
    assert sorted(sink.rows) == ids(51)
    assert set(sink.deliveries.values()) == {1}


async def test_flush_and_close_writes_everything_and_later_submits_are_kept(tmp_path: Path) -> None:
    # Real clock: the close itself writes, and a mock clock would jump to its deadline during those writes.
    sink = Sink()
    writer = make_writer(tmp_path, sink, flush_interval=60.0)
    with real_time_limit():
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit(writer, 25)
            await writer.flush_and_close(30)  # returns long before flush_interval: no wait for a fuller batch
            assert len(sink.rows) == 25
        # run() returned by itself: the nursery closed without a cancel.
    assert [call.size for call in sink.calls] == [10, 10, 5]
    writer.submit(sample_record(99))  # a request that finished after the flush
    assert spooled_ids(tmp_path) == ["req-0099"]
    assert writer.stats.spooled == 1

    restarted = make_writer(tmp_path, sink)
    with real_time_limit():
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)  # replays the spool on start
            await sink.wait_for(lambda: len(sink.rows) == 26)
            await restarted.flush_and_close(10)
    assert restarted.stats.spool_bytes == 0
    assert set(sink.deliveries.values()) == {1}


async def test_flush_and_close_with_database_down_keeps_everything_for_the_next_start(tmp_path: Path) -> None:
    sink = Sink()
    sink.down = True
    writer = make_writer(tmp_path, sink, flush_interval=60.0, retry_interval=60.0)
    with real_time_limit():
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit(writer, 25)
            await writer.flush_and_close(30)  # one failed attempt, then straight to the spool
    assert len(sink.failed_calls) == 1
    assert sorted(spooled_ids(tmp_path)) == ids(25)
    assert sink.rows == {}

    sink.down = False
    restarted = make_writer(tmp_path, sink)
    with real_time_limit():
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)
            await sink.wait_for(lambda: len(sink.rows) == 25)
            await restarted.flush_and_close(10)
    assert (tmp_path / "metering.spool").stat().st_size == 0
    assert set(sink.deliveries.values()) == {1}


async def test_flush_timeout_with_hung_database_cancels_run_and_saves_everything(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Sink()
    gate = sink.gate = threading.Event()
    writer = make_writer(tmp_path, sink)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit(writer, 1)
            await sink.wait_for(lambda: sink.entered == 1)
            submit(writer, 12, start=1)
            t0 = trio.current_time()
            await writer.flush_and_close(2)
            assert trio.current_time() - t0 == pytest.approx(2.0)
        assert sorted(spooled_ids(tmp_path)) == ids(13)  # the batch being written, and the queue
    finally:
        gate.set()

    fresh = Sink()
    restarted = make_writer(tmp_path, fresh)
    async with trio.open_nursery() as nursery:
        await nursery.start(restarted.run)
        await fresh.wait_for(lambda: len(fresh.rows) == 13)
        await close_idle(restarted)


@pytest.mark.parametrize("phase", ["collecting", "writing"])
async def test_cancelling_run_saves_the_queue_to_the_spool(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, phase: str
) -> None:
    sink = Sink()
    gate = threading.Event()
    if phase == "writing":
        sink.gate = gate
    writer = make_writer(tmp_path, sink)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit(writer, 7)  # collecting: the writer holds them while it waits for a fuller batch
            if phase == "writing":
                await sink.wait_for(lambda: sink.entered == 1)
                submit(writer, 4, start=7)
            else:
                await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() == t0  # run() left promptly
    finally:
        gate.set()
    expected = ids(7) if phase == "collecting" else ids(11)
    assert sorted(spooled_ids(tmp_path)) == expected
    writer.submit(sample_record(500))  # after run() ended: straight to the spool, fsynced by submit
    assert sorted(spooled_ids(tmp_path)) == sorted([*expected, "req-0500"])
    assert writer.stats.lost == 0
    # Released after the cancel, the abandoned write may still commit its batch: it is in the spool as well,
    # and the idempotent insert stores it once when the spool is replayed.
    assert set(sink.rows) <= set(ids(7))


async def test_torn_spool_line_is_skipped_on_replay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    codec = RecordCodec()
    spool = tmp_path / "metering.spool"
    spool.write_bytes(
        codec.encode_many([sample_record(i) for i in range(3)]) + codec.encode(sample_record(3))[:40]
    )
    sink = Sink()
    writer = make_writer(tmp_path, sink)
    with caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await sink.wait_for(lambda: len(sink.rows) == 3)
            await eventually(lambda: writer.stats.spool_bytes == 0)
            submit(writer, 1, start=10)
            await sink.wait_for(lambda: len(sink.rows) == 4)
            await close_idle(writer)
    assert sorted(sink.rows) == [*ids(3), "req-0010"]
    assert "torn line" in caplog.text
    assert "skipped an unreadable metering spool line" in caplog.text
    assert spool.stat().st_size == 0


# -- edges ---------------------------------------------------------------------------------------------------


async def test_without_run_the_queue_goes_to_the_spool_on_close(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, Sink(), queue_size=3)
    submit(writer, 5)  # 3 queued, 2 spooled at once
    assert (writer.stats.queued, writer.stats.spooled) == (3, 2)
    await writer.flush_and_close(1)
    assert sorted(spooled_ids(tmp_path)) == ids(5)
    assert writer.stats.queued == 0


async def test_a_record_the_spool_cannot_hold_is_counted_lost_not_raised(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, Sink(), queue_size=0)  # every record goes to the spool
    writer.submit(sample_record(1))
    writer.submit(sample_record(2, model=object()))
    writer.submit(sample_record(3))
    assert (writer.stats.spooled, writer.stats.lost) == (2, 1)
    assert spooled_ids(tmp_path) == ["req-0001", "req-0003"]


async def test_run_is_single_use_and_a_shared_spool_is_refused(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, Sink())
    other = make_writer(tmp_path, Sink())
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with pytest.raises(RuntimeError):
            await writer.run()
        with pytest.raises(SpoolError, match="in use"):
            await nursery.start(other.run)
        await writer.flush_and_close(1)
    assert "MeteringWriter" in repr(writer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        writer.stats.written = 1  # type: ignore[misc]
