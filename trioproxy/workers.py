"""``trioproxy serve --workers N``: one supervisor and N data-plane processes sharing the proxy port.

A single trio process is CPU-bound on one core (docs/BENCHMARKS.md), so the data plane scales out with processes
that each bind the proxy port with ``SO_REUSEPORT``; the kernel spreads new connections among their listeners.
Each worker has its own snapshot, connection pool, metering writer and spool; they meet in the supervisor, whose
:class:`~trioproxy.coordinator.Coordinator` keeps what must be one for the whole group: the limit counters (without Redis), the provider key states, the
reports the admin plane gathers (metrics, balancer status), and the database as the data planes use it
(snapshots, request rows, limit seeds; :mod:`trioproxy.supervisor_store`), so a worker loads no database code.
Each worker reaches it over a socket pair it inherits (``TRIOPROXY_SUPERVISOR_FD``). Worker 0 also serves the
admin API, which opens the database itself (SQLite in WAL mode with a busy timeout, or PostgreSQL).

The supervisor (this process) serves no traffic. In order, it:

1. prepares the store once, before any worker exists: migrations (embedded SQLite), the schema check, seed prices
   and the master key, so workers never race on them (a worker skips migrations, see ``app.open_store``);
2. replays orphaned metering spools into the database: ``metering.spool`` of a single-process run and
   ``metering-<i>.spool`` of a run with more workers than now, which no worker of this run will ever open;
3. reserves the port with a bound, non-listening ``SO_REUSEPORT`` socket: port 0 becomes one port for every
   worker, and no other program can take the port while a worker restarts;
4. starts worker ``i`` as ``python -m trioproxy.workers`` with ``TRIOPROXY_WORKER_INDEX=i`` (its own spool,
   ``metering-<i>.spool``, since a spool is ``flock``-ed by one process), the group's size, the reserved port
   and its end of a new socket pair to the coordinator (served until the worker exits); it relays each
   worker's stdout and prints ``trioproxy: proxy listening on HOST:PORT`` once all are listening;
5. restarts a worker that dies, after a back-off that doubles while it keeps dying young; a worker that dies
   before the group was first ready fails the start (exit 1) instead of looping on a bad configuration;
6. on SIGTERM or SIGINT sends SIGTERM to every worker (each drains its requests and flushes its metering, as a
   single process does), waits ``drain_timeout`` plus the metering flush plus a margin, kills what is left, and
   exits 0 when every worker stopped cleanly.

Workers read their settings as the single process does (environment, then ``TRIOPROXY_CONFIG``), with the index
and port set by the supervisor. A worker stops by itself when its supervisor is gone (its parent pid changes),
so a killed supervisor never leaves an orphan holding the port.

Resource handling: every worker process is owned by one keeper task; when that task is cancelled (the stop
deadline passed, or the start failed) it kills its process and reaps it under a bounded shield.

Error handling: :class:`WorkersFailed` (exit status 1 through the CLI) when the store cannot be prepared, the
port cannot be reserved, a worker fails to start, or a worker did not stop cleanly.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from trioproxy.app import METERING_FLUSH_TIMEOUT, ControlPlane, RunningGateway, open_store, run_gateway
from trioproxy.coordinator import Coordinator
from trioproxy.errors import TrioProxyError
from trioproxy.metering import MeteringWriter
from trioproxy.settings import Settings
from trioproxy.spool import SpoolError
from trioproxy.supervisor_store import SupervisorStore

if TYPE_CHECKING:
    # The supervisor's own: a worker (this module is its entry point) reaches the database through it.
    from sqlalchemy import Engine

logger = logging.getLogger(__name__)

# A worker that dies within this many seconds of its start counts as "dying young": the back-off doubles.
RESTART_YOUNG_SECONDS = 10.0
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
# Beyond drain_timeout and the metering flush: interpreter exit, engine disposal.
STOP_MARGIN_SECONDS = 10.0
# Reaping a killed worker (SIGKILL cannot be ignored; this only bounds the shield).
KILL_REAP_SECONDS = 5.0
# How often a worker checks that its supervisor is still alive.
PARENT_POLL_SECONDS = 0.5
# Replaying one orphaned spool into the database, at start.
ORPHAN_REPLAY_TIMEOUT = 30.0

# The line a worker prints once its proxy listener is up (see _run_worker).
_LISTENING = re.compile(rb"^trioproxy: worker \d+ \(pid \d+\) listening on ")
_SPOOL_NAME = re.compile(r"^metering(?:-(\d+))?\.spool$")


class WorkersFailed(TrioProxyError):
    """The worker group could not start, or did not stop cleanly."""


def default_worker_count() -> int:
    """The cores this process may run on (``taskset`` and cgroup cpusets included), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def serve_workers(settings: Settings, count: int, control_plane: str | None = None) -> None:
    """The ``trioproxy serve --workers N`` command: supervise ``count`` workers until SIGTERM/SIGINT.

    ``control_plane`` ("module:function", see :class:`trioproxy.app.ControlPlane`) runs in worker 0 only: one
    admin API per group. It is passed by name so that this package never imports the control plane.

    Returns when every worker stopped cleanly; raises :class:`WorkersFailed` otherwise.
    """
    if count < 1:
        raise WorkersFailed("--workers must be at least 1")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    reservation = _reserve_port(settings.proxy_host, settings.proxy_port)
    try:
        port: int = reservation.getsockname()[1]
        trio.run(_supervise, settings, count, port, control_plane)
    except BaseExceptionGroup as group:
        # A keeper's WorkersFailed arrives wrapped by the nursery; the CLI reports the error itself.
        failed, rest = group.split(WorkersFailed)
        if failed is None or rest is not None:
            raise
        leaf: BaseException = failed
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None
    finally:
        reservation.close()


def _reserve_port(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise WorkersFailed(f"cannot resolve the proxy address {host!r}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise WorkersFailed(f"cannot bind the proxy port {host}:{port}: {exc.strerror or exc}") from exc
    return sock


async def _supervise(settings: Settings, count: int, port: int, control_plane: str | None = None) -> None:
    try:
        engine, box = await trio.to_thread.run_sync(open_store, settings)
    except TrioProxyError as exc:
        raise WorkersFailed(f"cannot prepare the store: {exc.message}") from exc
    try:
        await _replay_orphan_spools(settings, count, engine)
        store = SupervisorStore(engine, box, settings.upstream)
        group = _WorkerGroup(
            settings, count, port, control_plane, Coordinator(store, instances=settings.instances)
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                group.nursery_scope = nursery.cancel_scope
                for index in range(count):
                    nursery.start_soon(group.keep, index)
                async for signum in signals:
                    logger.info("received %s: stopping %d workers", signal.Signals(signum).name, count)
                    group.stop()
                    break
    finally:
        with trio.move_on_after(KILL_REAP_SECONDS, shield=True):
            await trio.to_thread.run_sync(engine.dispose)
    if group.failures:
        raise WorkersFailed("workers did not stop cleanly: " + "; ".join(group.failures))


async def _replay_orphan_spools(settings: Settings, count: int, engine: Engine) -> None:
    """Write the records of spools that no worker of this run owns into the database (they stay spooled when
    the database is unavailable: nothing is deleted)."""
    from trioproxy.store.request_log import insert_request_records

    if not settings.data_dir.is_dir():
        return
    for path in sorted(settings.data_dir.iterdir()):
        match = _SPOOL_NAME.match(path.name)
        if match is None or (match.group(1) is not None and int(match.group(1)) < count):
            continue
        if path.stat().st_size == 0:
            continue
        writer = MeteringWriter(
            settings.metering,
            path,
            functools.partial(insert_request_records, engine),
        )
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(writer.run)
            except SpoolError as exc:  # a running single-process gateway still owns it
                logger.warning("skipping metering spool %s: %s", path.name, exc.message)
                continue
            await writer.flush_and_close(ORPHAN_REPLAY_TIMEOUT)
        logger.info("replayed orphaned metering spool %s: %r", path.name, writer)


@dataclass
class _WorkerGroup:
    settings: Settings
    count: int
    port: int
    control_plane: str | None = None  # "module:function", run by worker 0
    coordinator: Coordinator = field(default_factory=Coordinator)  # what the workers share
    nursery_scope: trio.CancelScope | None = None
    failures: list[str] = field(default_factory=list)
    _processes: dict[int, trio.Process] = field(default_factory=dict)
    _ready: set[int] = field(default_factory=set)
    _all_ready: trio.Event = field(default_factory=trio.Event)
    _stopping: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        """SIGTERM every worker; kill whatever has not exited when the stop budget runs out."""
        self._stopping.set()
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        budget = self.settings.drain_timeout + METERING_FLUSH_TIMEOUT + STOP_MARGIN_SECONDS
        if self.nursery_scope is not None:
            self.nursery_scope.deadline = min(self.nursery_scope.deadline, trio.current_time() + budget)

    async def keep(self, index: int) -> None:
        """Run worker ``index`` and restart it whenever it dies, until the group stops."""
        backoff = RESTART_BACKOFF_MIN
        env = {
            **os.environ,
            "TRIOPROXY_WORKER_INDEX": str(index),
            "TRIOPROXY_WORKER_COUNT": str(self.count),
            "TRIOPROXY_PROXY_PORT": str(self.port),
        }
        while not self._stopping.is_set():
            started = trio.current_time()
            command = [sys.executable, "-m", "trioproxy.workers"]
            if index == 0 and self.control_plane is not None:
                command += ["--control-plane", self.control_plane]
            # The worker's end of its channel to the coordinator is inherited under the same fd number.
            ours, theirs = socket.socketpair()
            try:
                env["TRIOPROXY_SUPERVISOR_FD"] = str(theirs.fileno())
                process = await trio.lowlevel.open_process(
                    command, env=env, stdout=subprocess.PIPE, pass_fds=(theirs.fileno(),)
                )
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self._processes[index] = process
            was_ready = False
            try:
                async with trio.open_nursery() as relay:
                    relay.start_soon(self._relay, index, process)
                    relay.start_soon(self.coordinator.serve_worker, index, ours)
                    code = await process.wait()
                was_ready = index in self._ready
            finally:
                self._ready.discard(index)
                if process.returncode is None:  # cancelled: the stop budget ran out, or the start failed
                    process.kill()
                    with trio.move_on_after(KILL_REAP_SECONDS, shield=True):
                        await process.wait()
                    self.failures.append(f"worker {index} (pid {process.pid}) was killed")
                del self._processes[index]
            if self._stopping.is_set():
                # A worker told to stop before it had its signal handler in place dies of the SIGTERM itself.
                clean = code == 0 or (code == -signal.SIGTERM and not was_ready)
                if not clean:
                    self.failures.append(f"worker {index} (pid {process.pid}) exited with status {code}")
                return
            if not self._all_ready.is_set():
                raise WorkersFailed(f"worker {index} exited with status {code} before it was ready")
            young = trio.current_time() - started < RESTART_YOUNG_SECONDS
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX) if young else RESTART_BACKOFF_MIN
            logger.error(
                "worker %d (pid %d) exited with status %s; restarting in %.1f s",
                index,
                process.pid,
                code,
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._stopping.wait()

    async def _relay(self, index: int, process: trio.Process) -> None:
        """Copy the worker's stdout to ours; its "listening on" line marks it ready."""
        assert process.stdout is not None
        pending = b""
        while True:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                sys.stdout.write(line.decode("utf-8", "replace") + "\n")
                if _LISTENING.search(line):
                    self._mark_ready(index)
            sys.stdout.flush()
        if pending:
            sys.stdout.write(pending.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()

    def _mark_ready(self, index: int) -> None:
        self._ready.add(index)
        if not self._all_ready.is_set() and len(self._ready) == self.count:
            self._all_ready.set()
            host = self.settings.proxy_host
            print(f"trioproxy: {self.count} workers ready", flush=True)
            print(f"trioproxy: proxy listening on {host}:{self.port}", flush=True)


# ------------------------------------------------------------------------------------------------- worker


async def _run_worker(settings: Settings, control_plane: ControlPlane | None = None) -> None:
    parent = os.getppid()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            gateway: RunningGateway = await nursery.start(
                functools.partial(run_gateway, settings, control_plane=control_plane)
            )
            # The admin line first: the supervisor announces the group once every worker's line arrived, and
            # whoever waits for that announcement expects to know the admin port by then.
            if gateway.admin_port is not None:
                print(f"trioproxy: admin listening on {settings.admin_host}:{gateway.admin_port}", flush=True)
            print(
                f"trioproxy: worker {settings.worker_index} (pid {os.getpid()}) listening on "
                f"{settings.proxy_host}:{gateway.proxy_port}",
                flush=True,
            )
            stop = trio.Event()

            async def on_signal() -> None:
                async for signum in signals:
                    logger.info("received %s: shutting down", signal.Signals(signum).name)
                    break
                stop.set()

            async def on_orphaned() -> None:
                # Polling: nothing wakes a process when its parent dies (short of prctl, which Python lacks).
                while os.getppid() == parent:  # noqa: ASYNC110
                    await trio.sleep(PARENT_POLL_SECONDS)
                logger.warning("the supervisor (pid %d) is gone: shutting down", parent)
                stop.set()

            async with trio.open_nursery() as waiters:
                waiters.start_soon(on_signal)
                waiters.start_soon(on_orphaned)
                await stop.wait()
                waiters.cancel_scope.cancel()
            # Later signals stay queued in the receiver (ignored) while the gateway drains and flushes.
            gateway.request_stop()


def worker_main() -> None:
    """Entry point of one worker (``python -m trioproxy.workers``), started by the supervisor."""
    settings = Settings.from_env()
    if settings.worker_index is None:
        raise SystemExit("trioproxy.workers is started by `trioproxy serve --workers N`")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [worker {settings.worker_index}] %(name)s: %(message)s",
    )
    control_plane = None
    if len(sys.argv) == 3 and sys.argv[1] == "--control-plane":
        module, _, name = sys.argv[2].partition(":")
        control_plane = getattr(importlib.import_module(module), name)
    trio.run(_run_worker, settings, control_plane)


if __name__ == "__main__":
    worker_main()
