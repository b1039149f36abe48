"""Process assembly: one trio process, one nursery tree.

::

    serve_forever (or a worker of `serve --workers N`, trioproxy.workers)
    └── run_gateway                       (one nursery: services, then the front)
        ├── supervisor link               (workers only: limits, key states, store and reports, via the supervisor)
        ├── admission                     (limits; with Redis or a supervisor: settlement tasks)
        ├── metering writer               (batches request rows into the database)
        ├── upstream connection pool      (housekeeping of idle provider connections)
        ├── config reloader               (swaps the snapshot when the config version moves)
        ├── shared key states             (with Redis: across instances; else, in a worker: across the group)
        ├── active key checks             (only when enabled: token-free probes of ejected/idle keys)
        ├── control plane :9090           (the admin API, started through the ``control_plane`` hook)
        └── front
            └── proxy server :8080        (one task per client connection)

The data plane never imports the control plane (``admin`` depends on ``trioproxy``, not the other way round):
the composition root, ``trioproxy serve`` in :mod:`trioproxy.cli`, passes the admin server in as the
``control_plane`` hook.

Shutdown (SIGTERM/SIGINT, or :meth:`RunningGateway.request_stop`) runs in this order: the proxy stops accepting and
drains in-flight requests until the drain deadline; then the metering writer flushes every queued row (into the
database, or the spool file if the database is unavailable); then the services are cancelled. Nothing here happens
at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from trioproxy.balancer import Balancer
from trioproxy.errors import ConfigError
from trioproxy.forward import Forwarder
from trioproxy.limits import Admission, FailurePolicy, LimitsSettings, open_admission
from trioproxy.metering import MeteringWriter
from trioproxy.metrics import Metrics
from trioproxy.pool import ConnectionPool
from trioproxy.reloader import ConfigReloader, SnapshotHolder
from trioproxy.server import ProxyServer
from trioproxy.settings import Settings
from trioproxy.ssrf import is_address_allowed
from trioproxy.supervisor_store import StoreSources, database_sources, worker_sources
from trioproxy.worker_link import LinkedKeyStates, SupervisorLink
from trioproxy.worker_reports import metric_families

if TYPE_CHECKING:
    # Imported where used: a worker of a group reaches the database through its supervisor and loads neither
    # SQLAlchemy nor cryptography (docs/ARCHITECTURE.md).
    from sqlalchemy import Engine

    from trioproxy.crypto import SecretBox

logger = logging.getLogger(__name__)

# How long the metering writer may take to flush on shutdown, after the drain.
METERING_FLUSH_TIMEOUT = 10.0


class ControlPlane(Protocol):
    """A service started beside the data plane once it is up; reports its bound port via ``task_status``."""

    async def __call__(
        self, gateway: RunningGateway, engine: Engine, box: SecretBox, *, task_status: trio.TaskStatus[int]
    ) -> None: ...


@dataclass
class RunningGateway:
    """Handle on a started gateway: its bound ports and its parts, for the CLI, tests and the benchmarks."""

    settings: Settings
    proxy_port: int
    snapshots: SnapshotHolder
    metering: MeteringWriter
    pool: ConnectionPool
    server: ProxyServer
    reloader: ConfigReloader
    engine: Engine | None  # None: a worker of a group, which reaches the database through its supervisor
    balancer: Balancer
    admission: Admission
    admin_port: int | None = None  # None: no control plane in this process
    metrics: Metrics = field(default_factory=Metrics)  # what the requests did, for /metrics
    # Under `serve --workers N`: the channel to the supervisor, through which the admin plane gathers the
    # reports of every worker (None in a single process).
    link: SupervisorLink | None = None
    _stop: trio.Event = field(default_factory=trio.Event)

    def request_stop(self) -> None:
        """Begin the graceful shutdown; the nursery that started the gateway waits for it to finish."""
        self._stop.set()

    def data_plane_state(self) -> dict[str, Any]:
        """This process's data plane right now, ready for JSON (the admin plane's detailed health)."""
        return {
            "running": True,
            "proxy_port": self.proxy_port,
            "config_version": self.snapshots.current.version,
            "in_flight": self.server.active_requests,
            "connections": dataclasses.asdict(self.pool.stats()),
            "metering": dataclasses.asdict(self.metering.stats),
        }

    async def gather(self, kind: str) -> list[Any]:
        """Every worker's report of ``kind`` ("metrics", "balancer", "data_plane"), by worker index: one, this
        process's, outside a worker group. Raises what :meth:`SupervisorLink.gather` raises."""
        if self.link is None:
            return [_report(self, kind)]
        return await self.link.gather(kind)


def _report(gateway: RunningGateway, kind: str) -> Any:
    if kind == "metrics":
        return metric_families(gateway.metrics, gateway)
    if kind == "balancer":
        return gateway.balancer.status(gateway.snapshots.current, now=trio.current_time())
    if kind == "data_plane":
        return gateway.data_plane_state()
    raise LookupError(f"no report {kind!r}")


def _add_reporters(link: SupervisorLink, gateway: RunningGateway) -> None:
    for kind in ("metrics", "balancer", "data_plane"):
        link.add_reporter(kind, functools.partial(_report, gateway, kind))


@contextlib.asynccontextmanager
async def _supervisor_link(settings: Settings) -> AsyncIterator[SupervisorLink | None]:
    """The channel to the supervisor of a worker group, running for the block; None outside a group."""
    if settings.supervisor_fd is None or settings.worker_index is None:
        yield None
        return
    link = SupervisorLink(settings.supervisor_fd, settings.worker_index)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        yield link
        nursery.cancel_scope.cancel()


def open_store(settings: Settings) -> tuple[Engine, SecretBox]:
    """Prepare the database (blocking: run it in a thread): migrate the embedded SQLite, check the schema, seed
    prices on first start, and load (or create) the master key for secrets at rest."""
    from trioproxy.crypto import SecretBox, load_or_create_master_key
    from trioproxy.store.db import create_engine_for, migrations_current, run_migrations
    from trioproxy.store.prices import seed_prices_if_empty

    url = settings.resolved_database_url
    # A worker of `serve --workers N` finds the schema migrated and checked by its supervisor, which ran this
    # before starting it (so a worker never loads Alembic).
    worker = settings.worker_index is not None
    if settings.is_embedded_sqlite and not worker:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        run_migrations(url)
    engine = create_engine_for(url)
    if not worker and not migrations_current(engine):
        engine.dispose()
        raise ConfigError("the database schema is not current: run `trioproxy migrate` first")
    seed_prices_if_empty(engine)
    return engine, SecretBox(load_or_create_master_key(settings))


async def run_gateway(
    settings: Settings,
    *,
    ssl_context: ssl.SSLContext | None = None,
    control_plane: ControlPlane | None = None,
    task_status: trio.TaskStatus[RunningGateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the data plane (and ``control_plane`` beside it) until :meth:`RunningGateway.request_stop` is called,
    then shut down gracefully."""
    async with (
        _supervisor_link(settings) as link,
        _opened_store(settings, link, for_control_plane=control_plane is not None) as (sources, engine, box),
    ):
        reloader = ConfigReloader(
            sources.read_version, sources.load_snapshot, poll_interval=settings.config_poll_interval
        )
        snapshots = await reloader.load_initial()
        metering = MeteringWriter(settings.metering, settings.spool_path, sources.insert_records)
        pool = ConnectionPool(
            max_connections_per_origin=settings.upstream.max_connections_per_origin,
            idle_expiry=settings.upstream.pool_idle_expiry,
            ssl_context=ssl_context or ssl.create_default_context(),
            address_allowed=functools.partial(
                is_address_allowed, allow_private=settings.allow_private_upstreams
            ),
            max_response_header_bytes=settings.upstream.max_response_header_bytes,
        )
        balancer = Balancer()
        limits = LimitsSettings(
            redis_url=settings.redis_url,
            redis_prefix=f"{settings.redis_prefix}:limits",
            redis_timeout=settings.redis_timeout,
            on_redis_failure=FailurePolicy(settings.redis_failure_policy),
            instances=settings.instances,
        )
        async with (
            open_admission(
                limits, sources.spend, link, processes=settings.instances * (settings.worker_count or 1)
            ) as admission,
            trio.open_nursery() as services,
        ):
            metrics = Metrics()
            forwarder = Forwarder(settings, snapshots, pool, metering, balancer, admission, metrics=metrics)
            server = ProxyServer(settings.limits, forwarder, forwarder.reject)
            await services.start(metering.run)
            await services.start(pool.run)
            await services.start(reloader.run)
            if settings.redis_url:
                from trioproxy.balancer.shared_state import SharedKeyStates

                await services.start(
                    SharedKeyStates(
                        balancer,
                        settings.redis_url,
                        prefix=f"{settings.redis_prefix}:balancer",
                        current_snapshot=lambda: snapshots.current,
                    ).run
                )
            elif link is not None:
                await services.start(LinkedKeyStates(balancer, link, lambda: snapshots.current).run)
            if settings.active_health_checks:
                from trioproxy.balancer.active_checks import ActiveChecker

                checker = ActiveChecker(
                    balancer,
                    lambda: snapshots.current,
                    allow_private=settings.allow_private_upstreams,
                    user_agent=settings.upstream.user_agent,
                    ssl_context=ssl_context,
                )
                await services.start(checker.run)
            async with trio.open_nursery() as front:
                port = await front.start(
                    functools.partial(server.serve, reuse_port=settings.worker_index is not None),
                    settings.proxy_host,
                    settings.proxy_port,
                )
                gateway = RunningGateway(
                    settings=settings,
                    proxy_port=port,
                    snapshots=snapshots,
                    metering=metering,
                    pool=pool,
                    server=server,
                    reloader=reloader,
                    engine=engine,
                    balancer=balancer,
                    admission=admission,
                    metrics=metrics,
                    link=link,
                )
                if link is not None:
                    _add_reporters(link, gateway)
                logger.info("proxy listening on %s:%s", settings.proxy_host, port)
                if control_plane is not None:
                    assert engine is not None
                    assert box is not None
                    gateway.admin_port = await services.start(
                        functools.partial(control_plane, gateway, engine, box)
                    )
                # Everything loaded so far (modules, the first snapshot, the admin app) lives as long as the
                # process: move it out of the cyclic collector's sight, so a full collection scans only what
                # requests allocate. Without this, a gen-2 collection over ~100 MB of startup objects paused
                # the event loop long enough to make paced token streams late.
                gc.collect()
                gc.freeze()
                task_status.started(gateway)
                await gateway._stop.wait()
                logger.info("draining %s in-flight requests", server.active_requests)
                await server.drain(trio.current_time() + settings.drain_timeout)
                front.cancel_scope.cancel()
            await metering.flush_and_close(METERING_FLUSH_TIMEOUT)
            services.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _opened_store(
    settings: Settings, link: SupervisorLink | None, *, for_control_plane: bool
) -> AsyncIterator[tuple[StoreSources, Engine | None, SecretBox | None]]:
    """The data plane's store, and the engine and secret box when this process needs its own: a single process
    (the data plane's store) or the worker that runs the control plane. A worker's data plane asks its
    supervisor (:mod:`trioproxy.supervisor_store`)."""
    engine: Engine | None = None
    box: SecretBox | None = None
    if link is None or for_control_plane:
        engine, box = await trio.to_thread.run_sync(open_store, settings)
    try:
        if link is not None:
            yield worker_sources(link), engine, box
        else:
            assert engine is not None
            assert box is not None
            yield database_sources(engine, box, settings.upstream), engine, box
    finally:
        if engine is not None:
            with trio.move_on_after(5, shield=True):
                await trio.to_thread.run_sync(engine.dispose)


async def _serve_until_signalled(settings: Settings, control_plane: ControlPlane | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            gateway: RunningGateway = await nursery.start(
                functools.partial(run_gateway, settings, control_plane=control_plane)
            )
            if gateway.admin_port is not None:
                print(f"trioproxy: admin listening on {settings.admin_host}:{gateway.admin_port}", flush=True)
            print(f"trioproxy: proxy listening on {settings.proxy_host}:{gateway.proxy_port}", flush=True)
            async for signum in signals:
                logger.info("received %s: shutting down", signal.Signals(signum).name)
                gateway.request_stop()
                break


def serve_forever(settings: Settings, control_plane: ControlPlane | None = None) -> None:
    """The ``trioproxy serve`` command: run until SIGTERM/SIGINT, drain, flush, return (exit status 0)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    trio.run(_serve_until_signalled, settings, control_plane)
