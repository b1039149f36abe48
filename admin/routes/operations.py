"""Operations: health, system information, the served routes, the load balancer's view and its commands, and
a gateway key's live limit state.

``/api/health`` answers without authentication (for load balancers) and says nothing but "ok". Everything else
reads the data plane running in the same process (``AdminState.gateway``); an admin API started without one
answers what it can and 503 where it needs the proxy's live state.

Tenancy: a caller without ``view_all_tenants`` sees only the pools of its own gateway keys, the health of the
provider keys it owns or pools, and the limits of its own gateway keys; another owner's key answers 404.

Key commands (``manage_health``): ``reset`` forgets a provider key's failures and puts it back in rotation at
once (in this process; shared through Redis when configured); ``disable`` and ``enable`` persist the key's
``enabled`` flag through the store (audited, live on the proxy within a second through the config version).
``manage_health`` lets its holder enable or disable any key it can see, not only its own: taking a failing key
out is the on-call operator's job. The key's secret, weight and limits stay with ``manage_provider_keys``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import ssl
import time
import urllib.parse
from collections import Counter
from typing import Any

import sqlalchemy as sa
import trio
from pydantic import Field
from quart import Blueprint
from quart_schema import tag, validate_response
from sqlalchemy.engine import Engine

import trioproxy
from admin.errors import ApiError
from admin.rbac import Access, current_actor, requires
from admin.schemas import Output, ProviderKeyOut
from admin.state import AdminState, gather_reports, get_state
from trioproxy.app import RunningGateway
from trioproxy.balancer import STRATEGY_NAMES, KeyState
from trioproxy.limits.admission import find_gateway_key
from trioproxy.roles import Permission
from trioproxy.routes import route_catalogue
from trioproxy.snapshot import ProviderKind, Snapshot
from trioproxy.store import gateway_key_store, provisioning
from trioproxy.store.actor import Actor, audit
from trioproxy.store.audit import is_secret_field
from trioproxy.store.db import write_session
from trioproxy.worker_reports import merge_balancer_status, merge_data_plane

bp = Blueprint("operations", __name__)

DB_CHECK_TIMEOUT = 2.0  # seconds: a health check must answer even when the database hangs
REDIS_CHECK_TIMEOUT = 2.0


# --- schemas ------------------------------------------------------------------------------------------------


class HealthOut(Output):
    status: str


class DatabaseHealth(Output):
    ok: bool
    latency_ms: float | None
    error: str | None = Field(description="the error's class, never its message")


class RedisHealth(Output):
    configured: bool
    ok: bool | None = Field(description="whether Redis answered PING; null when not configured")
    latency_ms: float | None = None
    error: str | None = None
    limits_backend: str | None = Field(
        description="what the proxy's limits use now: redis, fallback (Redis down: local limits), none, local"
    )


class ConnectionsOut(Output):
    origins: int
    idle: int
    in_use: int
    connecting: int
    waiting: int


class MeteringOut(Output):
    queued: int
    written: int
    spooled: int
    failed_batches: int
    spool_bytes: int
    lost: int
    last_error: str | None


class DataPlaneHealth(Output):
    running: bool
    proxy_port: int | None = None
    config_version: int | None = None
    in_flight: int | None = None
    connections: ConnectionsOut | None = None
    metering: MeteringOut | None = None
    workers: int | None = Field(
        default=None, description="data-plane processes whose figures are summed here"
    )


class KeyStatesOut(Output):
    total: int
    by_state: dict[str, int]


class DetailedHealthOut(Output):
    status: str = Field(description="ok, or degraded when a dependency is down")
    database: DatabaseHealth
    redis: RedisHealth
    data_plane: DataPlaneHealth
    provider_keys: KeyStatesOut | None


class PortsOut(Output):
    proxy: int | None
    admin: int | None


class HostsOut(Output):
    proxy: str
    admin: str


class InfraOut(Output):
    dialect: str | None = None
    url: str | None = Field(default=None, description="credentials masked")


class SystemInfoOut(Output):
    version: str
    python: str
    started_at: dt.datetime
    uptime_seconds: float
    hosts: HostsOut
    ports: PortsOut
    worker_index: int | None = Field(description="this process's index under serve --workers, else null")
    workers: int = Field(description="data-plane processes of this instance (serve --workers N), 1 without")
    instances: int = Field(description="gateway instances sharing the limits through Redis")
    data_plane: bool
    config_version: int | None
    database: InfraOut | None = Field(description="shown to callers who see every tenant")
    redis: InfraOut | None = Field(
        description="shown to callers who see every tenant; url null: not configured"
    )


class RouteOut(Output):
    name: str
    method: str
    path: str
    billable: bool
    streaming: str = Field(description="body: the body's stream field decides; always; never")
    selector: str | None


class AdapterOut(Output):
    kind: str
    routes: list[RouteOut]


class AdaptersOut(Output):
    providers: list[AdapterOut]
    strategies: list[str]


class PoolKeyOut(Output):
    id: int
    name: str
    position: int
    enabled: bool
    weight: int
    state: str
    reason: str | None
    available: bool
    in_flight: int
    trial_in_flight: bool
    ewma_latency_ms: float | None
    success_rate: float | None
    window_ok: int
    window_failed: int
    consecutive_failures: int
    ejections: int
    deadline_in: float | None = Field(description="seconds until a cooldown or ejection ends")
    last_error: str | None
    last_error_ago: float | None
    last_used_ago: float | None
    state_changes: int


class PoolOut(Output):
    gateway_key_id: int
    gateway_key_name: str
    gateway_key_prefix: str
    enabled: bool
    provider_id: int
    provider_name: str | None
    strategy: str
    effective_strategy: str
    retry_count: int
    usable_keys: int
    available_keys: int
    panic: bool
    retry_budget: float | None
    keys: list[PoolKeyOut]


class BalancerStatusOut(Output):
    data_plane: bool
    config_version: int | None
    pools: list[PoolOut]


class KeyHealthOut(Output):
    id: int
    state: str
    reason: str | None
    last_error: str | None


class LimitEntryOut(Output):
    scope: str
    name: str
    unit: str = Field(description="requests, tokens or usd")
    limit: int | str
    used: int | str = Field(description="open reservations included")
    remaining: int | str
    window_seconds: int | None = None
    period: str | None = None
    resets_at: dt.datetime | None = None


class LimitStateOut(Output):
    gateway_key_id: int
    backend: str
    limits: list[LimitEntryOut]
    spend_today_usd: str
    budget_left_usd: str | None
    user_budget_left_usd: str | None


# --- helpers ------------------------------------------------------------------------------------------------


def _gateway(state: AdminState) -> RunningGateway:
    if state.gateway is None:
        raise ApiError(
            503, "unavailable", "the proxy is not running in this process", headers={"Retry-After": "5"}
        )
    return state.gateway


def mask_url(url: str | None) -> str | None:
    """A database or Redis URL with its password (and any secret-looking query value) masked."""
    if not url:
        return None
    try:
        parsed = sa.make_url(url)
        query = {name: "***" if _secret_param(name) else value for name, value in parsed.query.items()}
        return parsed.set(query=query).render_as_string(hide_password=True)
    except Exception:
        return "***"  # unparseable: show nothing rather than a secret


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return is_secret_field(lowered) or "pass" in lowered or "secret" in lowered


def _database_check(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


async def _database_health(state: AdminState) -> dict[str, Any]:
    started = trio.current_time()
    error: str | None = None
    with trio.move_on_after(DB_CHECK_TIMEOUT) as deadline:
        try:
            await trio.to_thread.run_sync(
                _database_check, state.engine, limiter=state.db_limiter, abandon_on_cancel=True
            )
        except Exception as exc:
            error = type(exc).__name__
    if deadline.cancelled_caught:
        error = "timeout"
    latency = None if error else round((trio.current_time() - started) * 1000.0, 2)
    return {"ok": error is None, "latency_ms": latency, "error": error}


def _resp(*parts: str) -> bytes:
    """One Redis command in RESP."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def redis_ping(url: str) -> str | None:
    """None when Redis at ``url`` answers PING (after AUTH when the URL has credentials), else what went wrong.
    The server's own error text is never passed on (it may echo what it was sent)."""
    parsed = urllib.parse.urlsplit(url)
    commands = []
    if parsed.password is not None:
        user = urllib.parse.unquote(parsed.username or "")
        commands.append(_resp("AUTH", *([user] if user else []), urllib.parse.unquote(parsed.password)))
    commands.append(_resp("PING"))
    stream: trio.abc.Stream = await trio.open_tcp_stream(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    try:
        if parsed.scheme == "rediss":
            stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parsed.hostname)
        await stream.send_all(b"".join(commands))
        received = b""
        while received.count(b"\r\n") < len(commands):
            chunk = await stream.receive_some(4096)
            if not chunk or len(received) > 65536:
                return "unexpected answer"
            received += chunk
    finally:
        await trio.aclose_forcefully(stream)
    if any(not line.startswith(b"+") for line in received.split(b"\r\n")[: len(commands)]):
        return "refused (authentication?)"
    return None


async def _redis_health(url: str | None) -> dict[str, Any]:
    if not url:
        return {"configured": False, "ok": None, "latency_ms": None, "error": None}
    started = trio.current_time()
    error: str | None = "timeout"
    with trio.move_on_after(REDIS_CHECK_TIMEOUT):
        try:
            error = await redis_ping(url)
        except Exception as exc:
            error = type(exc).__name__
    latency = None if error else round((trio.current_time() - started) * 1000.0, 2)
    return {"configured": True, "ok": error is None, "latency_ms": latency, "error": error}


def _visible_key_ids(snapshot: Snapshot, actor: Actor) -> set[int]:
    """Provider keys whose health ``actor`` may see: every key, or its own and those in its own pools."""
    if actor.owner_filter() is None:
        return set(snapshot.provider_keys)
    own = {k.id for k in snapshot.provider_keys.values() if k.owner_id == actor.user_id}
    for gateway_key in snapshot.gateway_keys.values():
        if gateway_key.owner_id == actor.user_id:
            own.update(gateway_key.pool)
    return own & set(snapshot.provider_keys)


def _key_health(gateway: RunningGateway, key_id: int) -> dict[str, Any]:
    health = gateway.balancer.key_health(key_id)
    if health is None:
        return {"id": key_id, "state": KeyState.ACTIVE.value, "reason": None, "last_error": None}
    return {
        "id": key_id,
        "state": health.state.value,
        "reason": health.reason,
        "last_error": health.last_error,
    }


def _record_reset(
    engine: Engine, actor: Actor, key_id: int, before: dict[str, Any], after: dict[str, Any]
) -> None:
    with write_session(engine) as session:
        audit(session, actor, "reset_health", "provider_key", key_id, before=before, after=after)


def _health_actor(actor: Actor) -> Actor:
    """The actor the store sees for enable/disable: who sees every tenant may switch every key (module doc)."""
    if actor.view_all and not actor.manage_all:
        return dataclasses.replace(actor, permissions=actor.permissions | {Permission.MANAGE_ALL_TENANTS})
    return actor


# --- health and system --------------------------------------------------------------------------------------


@bp.get("/api/health")
@requires(Access.PUBLIC)
@tag(["operations"])
@validate_response(HealthOut)
async def health() -> dict[str, Any]:
    """Liveness for load balancers: 200 ``{"status": "ok"}`` while the process serves. No authentication."""
    return {"status": "ok"}


@bp.get("/api/health/detailed")
@requires(Permission.VIEW_HEALTH)
@tag(["operations"])
@validate_response(DetailedHealthOut)
async def health_detailed() -> dict[str, Any]:
    """Database, Redis, the proxy and the health states of the provider keys the caller may see."""
    state = get_state()
    database = await _database_health(state)
    redis = await _redis_health(state.settings.redis_url)
    redis["limits_backend"] = None
    gateway = state.gateway
    data_plane: dict[str, Any] = {"running": False}
    provider_keys = None
    if gateway is not None:
        redis["limits_backend"] = gateway.admission.backend_name
        snapshot = gateway.snapshots.current
        data_plane = merge_data_plane(await gather_reports(gateway, "data_plane"))
        states: Counter[str] = Counter()
        for key_id in _visible_key_ids(snapshot, current_actor()):
            states[_key_health(gateway, key_id)["state"]] += 1
        provider_keys = {"total": sum(states.values()), "by_state": dict(sorted(states.items()))}
    healthy = database["ok"] and redis["ok"] is not False and gateway is not None
    return {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "redis": redis,
        "data_plane": data_plane,
        "provider_keys": provider_keys,
    }


@bp.get("/api/system/info")
@requires(Permission.VIEW_HEALTH)
@tag(["operations"])
@validate_response(SystemInfoOut)
async def system_info() -> dict[str, Any]:
    """Version, uptime, addresses and workers of this process.

    The database and Redis URLs (credentials masked) are shown to callers who see every tenant."""
    state = get_state()
    settings, gateway = state.settings, state.gateway
    infra = current_actor().view_all
    database_url = settings.resolved_database_url
    return {
        "version": trioproxy.__version__,
        "python": platform.python_version(),
        "started_at": dt.datetime.fromtimestamp(state.started_at, dt.UTC),
        "uptime_seconds": round(time.time() - state.started_at, 3),
        "hosts": {"proxy": settings.proxy_host, "admin": settings.admin_host},
        "ports": {
            "proxy": gateway.proxy_port if gateway is not None else None,
            "admin": gateway.admin_port if gateway is not None else None,
        },
        "worker_index": settings.worker_index,
        "workers": settings.worker_count or 1,
        "instances": settings.instances,
        "data_plane": gateway is not None,
        "config_version": gateway.snapshots.current.version if gateway is not None else None,
        "database": {"dialect": state.engine.dialect.name, "url": mask_url(database_url)} if infra else None,
        "redis": {"dialect": "redis" if settings.redis_url else None, "url": mask_url(settings.redis_url)}
        if infra
        else None,
    }


@bp.get("/api/adapters")
@requires(Access.AUTHENTICATED)
@tag(["operations"])
@validate_response(AdaptersOut)
async def adapters() -> dict[str, Any]:
    """The provider kinds the proxy speaks, the routes it serves for each, and the balancing strategies.

    Every other path answers 404 on the proxy."""
    catalogue = route_catalogue()
    return {
        "providers": [
            {
                "kind": kind.value,
                "routes": [dataclasses.asdict(r) for r in catalogue if r.kind is kind],
            }
            for kind in ProviderKind
        ],
        "strategies": list(STRATEGY_NAMES),
    }


# --- load balancer ------------------------------------------------------------------------------------------


@bp.get("/api/loadbalancer/status")
@requires(Permission.VIEW_HEALTH)
@tag(["load balancer"])
@validate_response(BalancerStatusOut)
async def balancer_status() -> dict[str, Any]:
    """Every pool (gateway key) with its strategy, and the state of each provider key in it.

    Per key: state and why, weight, in-flight count, EWMA latency, success rate over the recent window,
    seconds until a cooldown or ejection ends, and the last error."""
    state = get_state()
    if state.gateway is None:
        return {"data_plane": False, "config_version": None, "pools": []}
    gateway = state.gateway
    snapshot = gateway.snapshots.current
    pools = merge_balancer_status(await gather_reports(gateway, "balancer"))
    owner = current_actor().owner_filter()
    if owner is not None:
        mine = {g.id for g in snapshot.gateway_keys.values() if g.owner_id == owner}
        pools = [pool for pool in pools if pool["gateway_key_id"] in mine]
    return {"data_plane": True, "config_version": snapshot.version, "pools": pools}


@bp.post("/api/loadbalancer/keys/<id:key_id>/reset")
@requires(Permission.MANAGE_HEALTH)
@tag(["load balancer"])
@validate_response(KeyHealthOut)
async def reset_key(key_id: int) -> dict[str, Any]:
    """Forget the provider key's failures, cooldown or ejection: it is back in rotation at once."""
    state = get_state()
    actor = current_actor()
    await state.db(provisioning.get_provider_key, state.engine, key_id, actor=actor)  # 404 unless visible
    gateway = _gateway(state)
    before = _key_health(gateway, key_id)
    gateway.balancer.reset_key(key_id, now=trio.current_time())
    after = _key_health(gateway, key_id)
    await state.db(_record_reset, state.engine, actor, key_id, before, after)
    return after


async def _set_enabled(key_id: int, enabled: bool) -> dict[str, Any]:
    state = get_state()
    actor = current_actor()
    await state.db(provisioning.get_provider_key, state.engine, key_id, actor=actor)  # 404 unless visible
    return await state.db(
        provisioning.set_provider_key_enabled, state.engine, key_id, enabled, actor=_health_actor(actor)
    )


@bp.post("/api/loadbalancer/keys/<id:key_id>/disable")
@requires(Permission.MANAGE_HEALTH)
@tag(["load balancer"])
@validate_response(ProviderKeyOut)
async def disable_key(key_id: int) -> dict[str, Any]:
    """Take the provider key out of every pool (persisted; live on the proxy within a second)."""
    return await _set_enabled(key_id, False)


@bp.post("/api/loadbalancer/keys/<id:key_id>/enable")
@requires(Permission.MANAGE_HEALTH)
@tag(["load balancer"])
@validate_response(ProviderKeyOut)
async def enable_key(key_id: int) -> dict[str, Any]:
    """Put a disabled provider key back (persisted); it starts with a clean health record."""
    return await _set_enabled(key_id, True)


# --- limits -------------------------------------------------------------------------------------------------


@bp.get("/api/keys/<id:key_id>/limits")
@requires(Permission.VIEW_KEYS)
@tag(["gateway keys"])
@validate_response(LimitStateOut)
async def key_limits(key_id: int) -> dict[str, Any]:
    """A gateway key's limit state right now.

    Current window counts (open reservations included), spend today, and budget left (the key's own and its
    owner's)."""
    state = get_state()
    await state.db(gateway_key_store.get_gateway_key, state.engine, key_id, actor=current_actor())
    gateway = _gateway(state)
    snapshot = gateway.snapshots.current
    view = find_gateway_key(snapshot, key_id)
    if view is None:
        raise ApiError(409, "not_live", "the key is not in the live configuration yet; try again in a second")
    user = snapshot.users.get(view.owner_id) if view.owner_id is not None else None
    limit_state = await gateway.admission.limit_state(view, time.time(), user)
    for entry in limit_state["limits"]:
        resets_at = entry.get("resets_at")
        if resets_at is not None:
            entry["resets_at"] = dt.datetime.fromtimestamp(resets_at, dt.UTC)
    return limit_state
