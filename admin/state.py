"""What the admin app runs on: one typed :class:`AdminState` per process, created by the caller.

The process assembly builds it from what the data plane already opened (settings, engine, secret box) with
:func:`build_state`, and hands it to :func:`admin.app.create_app` / :func:`admin.serve.serve_admin`. Routes reach
it with :func:`get_state`; nothing lives in module globals.

Blocking work leaves the event loop through two limiters: :meth:`AdminState.db` for SQLAlchemy calls and
:meth:`AdminState.cpu` for argon2 (each verification holds 19 MiB and ~50 ms of a core, so only a few run at once).
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import trio
from quart import current_app
from sqlalchemy.engine import Engine

from admin.auth import LoginThrottle, TokenService, jwt_key_for
from admin.errors import ApiError
from trioproxy.crypto import SecretBox
from trioproxy.ipc import ChannelClosed, RemoteError
from trioproxy.settings import Settings

if TYPE_CHECKING:
    from trioproxy.app import RunningGateway

P = ParamSpec("P")
R = TypeVar("R")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
EXTENSION = "trioproxy_admin"
DB_THREADS = 8
HASH_THREADS = 2


@dataclass
class AdminState:
    """Everything the admin plane needs; ``gateway`` is the data plane running in the same process, if any
    (health, load-balancer status and metrics read it)."""

    settings: Settings
    engine: Engine
    box: SecretBox
    tokens: TokenService
    gateway: RunningGateway | None = None
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    started_at: float = field(default_factory=time.time)
    db_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(DB_THREADS))
    hash_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(HASH_THREADS))
    trusted_proxies: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if not self.trusted_proxies:
            self.trusted_proxies = tuple(
                ipaddress.ip_network(cidr, strict=False) for cidr in self.settings.trusted_proxies
            )

    async def db(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking store call in a worker thread."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.db_limiter)

    async def cpu(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a CPU-heavy call (password hashing) in a worker thread of its own small pool."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.hash_limiter
        )


def build_state(
    settings: Settings, engine: Engine, box: SecretBox, *, gateway: RunningGateway | None = None
) -> AdminState:
    """The state of a process whose store is open (blocking: reads the master key for the JWT key)."""
    return AdminState(
        settings=settings, engine=engine, box=box, tokens=TokenService(jwt_key_for(settings)), gateway=gateway
    )


def get_state() -> AdminState:
    """The state of the app serving the current request."""
    state: Any = current_app.extensions[EXTENSION]
    assert isinstance(state, AdminState)
    return state


async def gather_reports(gateway: RunningGateway, kind: str) -> list[Any]:
    """Every worker's report of ``kind`` (one, this process's, outside ``serve --workers N``); 503 when the
    supervisor cannot be reached."""
    try:
        return await gateway.gather(kind)
    except (ChannelClosed, RemoteError, trio.TooSlowError) as exc:
        raise ApiError(
            503,
            "unavailable",
            f"the workers' {kind} could not be gathered ({type(exc).__name__})",
            headers={"Retry-After": "1"},
        ) from exc
