"""Process settings, read once from the environment (and an optional TOML file).

Only what a process needs before it can reach its database lives here; providers, keys, prices and limits live in
the database and change live. Every limit on untrusted input is a named field with its precedent in a comment, so
an operator can find and tune it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from trioproxy.errors import ConfigError

ENV_PREFIX = "TRIOPROXY_"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Limits the :8080 server applies to every client connection."""

    # h11's own default and HAProxy's 16 KiB buffer; answered with 431.
    max_header_bytes: int = 16 * 1024
    # Envoy's max_headers_count default; answered with 431.
    max_header_count: int = 100
    # nginx's large_client_header_buffers (8 KiB); answered with 414.
    max_target_bytes: int = 8 * 1024
    # Gemini inline files need more than hypercorn's 16 MiB; answered with 413.
    max_body_bytes: int = 32 * 1024 * 1024
    # CIS benchmark's 10 s from the first byte to the end of the headers; answered with 408.
    header_timeout: float = 10.0
    # Between two reads of a request body (nginx client_body_timeout is 60 s); answered with 408.
    body_read_timeout: float = 30.0
    # Idle keep-alive connection between requests (nginx 75 s); closed silently.
    keepalive_timeout: float = 60.0
    # Requests on one keep-alive connection (hypercorn's keep_alive_max_requests).
    max_requests_per_connection: int = 1000
    # No progress on a write to the client (nginx send_timeout 60 s); the stream is aborted.
    send_timeout: float = 60.0
    # Simultaneous client connections (Envoy listener limit is 10,000; ours is sized for 2 cores).
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Defaults for talking to providers; a provider row may override the timeouts."""

    connect_timeout: float = 10.0  # TCP connect plus TLS handshake
    first_byte_timeout: float = 300.0  # request sent -> response head (reasoning models think long)
    idle_timeout: float = 300.0  # between two body chunks (Envoy stream_idle_timeout, 5 min)
    total_timeout: float = 600.0  # the whole exchange (Envoy max_stream_duration)
    max_connections_per_origin: int = 100
    pool_idle_expiry: float = 60.0  # idle pooled connections are closed after this long
    max_response_header_bytes: int = 16 * 1024
    max_response_body_bytes: int = 64 * 1024 * 1024  # non-streamed bodies only (OWASP API10)
    user_agent: str = "trioproxy/0.1"
    # A 200 stream's response head is held back until its first event, at most this long, so that an error
    # arriving as the first event can still be retried on another key (after that the stream is committed).
    first_event_hold: float = 5.0


@dataclass(frozen=True, slots=True)
class MeteringSettings:
    """The request-row pipeline from the proxy to the database."""

    queue_size: int = 10_000  # rows waiting in memory before they spill to the spool file
    batch_size: int = 500
    flush_interval: float = 0.2
    retry_interval: float = 1.0  # between attempts while the database is unavailable


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything one trioproxy process is started with."""

    proxy_host: str = "0.0.0.0"
    proxy_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file in data_dir
    redis_url: str | None = None
    redis_prefix: str = "trioproxy"  # namespace of every Redis key, so deployments can share one server
    # One limits decision's deadline on Redis; past it the Redis-failure policy applies (see trioproxy.limits).
    redis_timeout: float = 0.5
    secret_key: str | None = None  # empty: read or generate data_dir/secret.key
    admin_password: str | None = None
    # Browser origins allowed to call the admin API (comma-separated, e.g. "https://admin.example.com"); empty:
    # CORS off. Never "*": the admin API takes bearer tokens.
    admin_cors_origins: str = ""
    # When set, GET /metrics on the admin port wants "Authorization: Bearer <token>" (for Prometheus'
    # bearer_token); unset, it is public like /api/health (aggregates only, admin port on 127.0.0.1).
    metrics_token: str | None = None
    allow_private_upstreams: bool = False
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For we believe
    drain_timeout: float = 30.0
    # Gateway instances (hosts, or separate `serve` commands) sharing the limits. Without Redis each instance
    # gets limit // instances (its workers share that share exactly, through their supervisor).
    instances: int = 1
    # When Redis (or a worker's supervisor) is unreachable: "fail_open_local" (local limits divided by the
    # processes sharing them, instances x workers) or "fail_closed" (503).
    redis_failure_policy: str = "fail_open_local"
    # Token-free probes (model lists) of ejected and idle provider keys.
    active_health_checks: bool = False
    config_poll_interval: float = 0.25
    log_level: str = "INFO"
    # Set by the `serve --workers N` supervisor in each data-plane process it starts (0..N-1): the proxy listener
    # then binds with SO_REUSEPORT, and the worker has a metering spool of its own (the spool is flock'ed).
    worker_index: int | None = None
    # Also set by the supervisor: the size of the group, and the inherited socket to the supervisor (limits and
    # key states shared by the workers, reports for the admin plane; see trioproxy.coordinator).
    worker_count: int | None = None
    supervisor_fd: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    metering: MeteringSettings = field(default_factory=MeteringSettings)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'trioproxy.db').resolve()}"

    @property
    def spool_path(self) -> Path:
        if self.worker_index is not None:
            return self.data_dir / f"metering-{self.worker_index}.spool"
        return self.data_dir / "metering.spool"

    @property
    def is_embedded_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, toml_path: Path | None = None) -> Settings:
        """Build settings: defaults, then the TOML file (``TRIOPROXY_CONFIG``), then the environment.

        Top-level keys of the TOML file are the field names (``proxy_port = 8080``); the tables ``[limits]``,
        ``[upstream]`` and ``[metering]`` hold the nested fields. Environment variables use the upper-case field
        name with the ``TRIOPROXY_`` prefix; nested fields join with ``__`` (``TRIOPROXY_LIMITS__MAX_BODY_BYTES``).
        """
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        toml_file = toml_path or (
            Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None
        )
        if toml_file is not None:
            try:
                raw = tomllib.loads(toml_file.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {toml_file}: {exc}") from exc
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
                continue
            path = name[len(ENV_PREFIX) :].lower().split("__")
            target = raw
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = value
        settings: Settings = _build(cls(), raw)
        return settings


def _build(base: Any, raw: Mapping[str, Any]) -> Any:
    changes: dict[str, Any] = {}
    known = {f.name: f for f in fields(base)}
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        current = getattr(base, name)
        if isinstance(current, ServerLimits | UpstreamSettings | MeteringSettings):
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting {name!r} must be a table")
            changes[name] = _build(current, value)
        else:
            changes[name] = _coerce(name, known[name].type, value)
    return replace(base, **changes)


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(value)
        if kind == "int":
            return int(value)
        if kind == "int | None":
            return int(value) if str(value).strip() else None
        if kind == "float":
            return float(value)
        if kind == "Path":
            return Path(value)
        if kind == "tuple[str, ...]":
            items = value if isinstance(value, list) else str(value).split(",")
            cidrs = tuple(str(item).strip() for item in items if str(item).strip())
            for cidr in cidrs:
                ipaddress.ip_network(cidr, strict=False)
            return cidrs
        if kind == "str | None":
            return str(value) if str(value) else None
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"setting {name!r} has an invalid value") from exc
