"""Serving the admin app with hypercorn's trio worker inside the caller's nursery.

:func:`serve_admin` creates the bootstrap administrator if the database has no users, binds (port 0 picks a free
port), reports the bound port through ``task_status.started(port)``, and serves until it is cancelled.

Graceful stop: cancelling the caller's scope does not cut requests off mid-answer. The server runs in a shielded
scope; on cancellation serve_admin fires hypercorn's shutdown trigger (stop accepting, close idle keep-alive
connections, let in-flight requests finish for ``grace`` seconds), and the shield has a deadline of its own, so
the stop is bounded even if a request hangs.

Resource handling: the listening socket and every connection belong to hypercorn's nurseries, which live inside
this call; nothing outlives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from sqlalchemy import Engine

from admin.app import create_app
from admin.auth import bootstrap_admin
from admin.state import AdminState, build_state
from trioproxy.app import RunningGateway
from trioproxy.crypto import SecretBox

logger = logging.getLogger("admin")

GRACE = 5.0  # seconds in-flight admin requests get to finish on shutdown
KEEP_ALIVE_TIMEOUT = 5.0
READ_TIMEOUT = 30  # between two reads of a request (slowloris); hypercorn has none by default


def _announce(message: str) -> None:
    # Printed, not logged: a generated password must not travel to a log shipper.
    print(message, flush=True)


def _config(host: str, port: int, grace: float) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.read_timeout = READ_TIMEOUT
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("admin.hypercorn")
    return config


def _bound_port(binds: list[str]) -> int:
    # hypercorn reports "http://127.0.0.1:43211" or "http://[::1]:43211".
    return int(binds[0].rsplit(":", 1)[1])


async def serve_admin(
    state: AdminState,
    host: str,
    port: int,
    *,
    grace: float = GRACE,
    announce: Callable[[str], None] = _announce,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on ``host:port`` until cancelled, then stop gracefully (bounded by ``grace``)."""
    app = create_app(state)
    await bootstrap_admin(state, announce)
    config = _config(host, port, grace)
    stop = trio.Event()
    shield = trio.CancelScope(shield=True)

    async def run_server(*, task_status: trio.TaskStatus[list[str]]) -> None:
        with shield:
            await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(partial(run_server))
            bound = _bound_port(binds)
            logger.info("admin API listening on %s:%s", host, bound)
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            # Before the nursery waits for the shielded server: ask it to stop, and bound how long it may take
            # (hypercorn's own graceful_timeout, plus a second for its lifespan shutdown).
            stop.set()
            shield.deadline = trio.current_time() + grace + 1.0


async def run_control_plane(
    gateway: RunningGateway,
    engine: Engine,
    box: SecretBox,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The control plane of a running data plane (the ``control_plane`` hook of
    :func:`trioproxy.app.run_gateway`): serve the admin API on the configured admin address."""
    settings = gateway.settings
    state = await trio.to_thread.run_sync(partial(build_state, settings, engine, box, gateway=gateway))
    await serve_admin(state, settings.admin_host, settings.admin_port, task_status=task_status)
