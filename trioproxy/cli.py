"""The ``trioproxy`` command line: migrate, provision, inspect usage, serve.

Every command prints one JSON document on stdout. A failure prints ``{"error": {"type": ..., "message":
...}}`` on stderr and exits 2 for bad input (usage errors, validation, unknown or duplicate objects) or 1 for
anything else (database unreachable, schema not migrated, unreadable master key). Settings come from the
environment (:meth:`trioproxy.settings.Settings.from_env`).

On the embedded SQLite database, provisioning commands migrate first, so a fresh install can be provisioned
before the first ``serve``; on PostgreSQL the schema is an operator's decision and they require ``trioproxy
migrate``.

No command prints a secret, except the new gateway key that ``key create`` shows once. ``--secret -`` reads a
provider key from standard input so it stays out of shell history and ``ps``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from trioproxy.crypto import SecretBox, load_or_create_master_key
from trioproxy.errors import ConfigError, ConflictError, NotFoundError, TrioProxyError, ValidationError
from trioproxy.settings import Settings
from trioproxy.store.db import create_engine_for, migrations_current, run_migrations
from trioproxy.store.prices import seed_prices_if_empty
from trioproxy.store.provisioning import (
    add_provider,
    add_provider_key,
    create_gateway_key,
    list_gateway_keys,
    list_provider_keys,
    list_providers,
)
from trioproxy.store.request_log import recent_requests

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

Handler = Callable[[argparse.Namespace, Settings], Any]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become JSON like every other failure."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


# --- store access -------------------------------------------------------------------------------------------


def _open_engine(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    if settings.is_embedded_sqlite:
        run_migrations(url)
    engine = create_engine_for(url)
    try:
        if not migrations_current(engine):
            raise ConfigError("the database schema is not current: run `trioproxy migrate` first")
        seed_prices_if_empty(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _with_engine(settings: Settings, work: Callable[[Engine], Any]) -> Any:
    engine = _open_engine(settings)
    try:
        return work(engine)
    finally:
        engine.dispose()


# --- commands -----------------------------------------------------------------------------------------------


def _cmd_migrate(_args: argparse.Namespace, settings: Settings) -> Any:
    url = settings.resolved_database_url
    run_migrations(url)
    engine = create_engine_for(url)
    try:
        seeded = seed_prices_if_empty(engine)
    finally:
        engine.dispose()
    return {
        "migrated": True,
        "database": make_url(url).render_as_string(hide_password=True),
        "seeded_prices": seeded,
    }


def _parse_headers(items: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValidationError("a header must be given as NAME=VALUE")
        headers[name.strip()] = value.strip()
    return headers


def _cmd_provider_add(args: argparse.Namespace, settings: Settings) -> Any:
    headers = _parse_headers(args.header)
    return _with_engine(
        settings,
        lambda engine: add_provider(
            engine,
            name=args.name,
            kind=args.kind,
            base_url=args.base_url,
            headers=headers,
            connect_timeout=args.connect_timeout,
            first_byte_timeout=args.first_byte_timeout,
            idle_timeout=args.idle_timeout,
            total_timeout=args.total_timeout,
            allow_private=settings.allow_private_upstreams,
        ),
    )


def _cmd_provider_list(_args: argparse.Namespace, settings: Settings) -> Any:
    return _with_engine(settings, list_providers)


def _read_secret(value: str) -> str:
    if value != "-":
        return value
    # Only the first line: a trailing newline from `echo` or a here-string is not part of the key.
    return sys.stdin.readline().strip()


def _cmd_provider_key_add(args: argparse.Namespace, settings: Settings) -> Any:
    secret = _read_secret(args.secret)
    box = SecretBox(load_or_create_master_key(settings))
    return _with_engine(
        settings,
        lambda engine: add_provider_key(
            engine, box, provider=args.provider, name=args.name, secret=secret, weight=args.weight
        ),
    )


def _cmd_provider_key_list(args: argparse.Namespace, settings: Settings) -> Any:
    return _with_engine(settings, lambda engine: list_provider_keys(engine, args.provider))


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_expiry(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            "--expires-at must be an ISO-8601 date or time, e.g. 2027-01-01T00:00:00Z"
        ) from None
    # A bare date or time without an offset means UTC: a server's local zone is nobody's intent.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _cmd_key_create(args: argparse.Namespace, settings: Settings) -> Any:
    pool = _split_list(args.provider_keys)
    models = _split_list(args.allowed_models)
    expires = _parse_expiry(args.expires_at)
    return _with_engine(
        settings,
        lambda engine: create_gateway_key(
            engine,
            name=args.name,
            provider=args.provider,
            provider_keys=pool,
            strategy=args.strategy,
            retry_count=args.retry_count,
            allowed_models=models,
            expires_at=expires,
        ),
    )


def _cmd_key_list(_args: argparse.Namespace, settings: Settings) -> Any:
    return _with_engine(settings, list_gateway_keys)


def _cmd_usage(args: argparse.Namespace, settings: Settings) -> Any:
    if args.last < 0:
        raise ValidationError("--last must be >= 0")
    return _with_engine(settings, lambda engine: recent_requests(engine, args.last))


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> Any:
    # Imported here: the planes pull in trio, the proxy and Quart, which provisioning commands never need. This
    # command is the composition root: the data plane gets the control plane as a hook and never imports it.
    from admin.serve import run_control_plane
    from trioproxy.app import serve_forever
    from trioproxy.workers import default_worker_count, serve_workers

    control_plane = f"{run_control_plane.__module__}:{run_control_plane.__name__}"
    if args.workers == "auto":
        count = default_worker_count()
    else:
        try:
            count = int(args.workers)
        except ValueError:
            raise ValidationError(
                "--workers takes a number of processes, or nothing for one per core"
            ) from None
        if count < 1:
            raise ValidationError("--workers must be at least 1")
    if count == 1:
        serve_forever(settings, run_control_plane)  # one process: no supervisor, nothing to coordinate
    else:
        serve_workers(settings, count, control_plane)
    return None


# --- parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trioproxy", description="A self-hosted AI API gateway on Trio.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(handler=_cmd_migrate)

    serve = commands.add_parser("serve", help="run the gateway until SIGTERM/SIGINT")
    serve.add_argument(
        "--workers",
        nargs="?",
        const="auto",
        default="auto",
        metavar="N",
        help="data-plane processes sharing the port (SO_REUSEPORT) under a supervisor (default, or "
        "--workers alone: one per core); --workers 1: one process, no supervisor",
    )
    serve.set_defaults(handler=_cmd_serve)

    provider = commands.add_parser("provider", help="upstream providers").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    provider_add = provider.add_parser("add", help="add a provider")
    provider_add.add_argument("name")
    provider_add.add_argument("--kind", required=True, help="openai, anthropic or gemini")
    provider_add.add_argument("--base-url", required=True, help="e.g. https://api.openai.com/v1")
    provider_add.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    for name in ("connect", "first-byte", "idle", "total"):
        provider_add.add_argument(f"--{name}-timeout", type=float, default=None, metavar="SECONDS")
    provider_add.set_defaults(handler=_cmd_provider_add)
    provider.add_parser("list", help="list providers").set_defaults(handler=_cmd_provider_list)

    provider_key = commands.add_parser("provider-key", help="provider API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    pk_add = provider_key.add_parser("add", help="store a provider API key (encrypted)")
    pk_add.add_argument("--provider", required=True)
    pk_add.add_argument("--name", required=True)
    pk_add.add_argument("--secret", required=True, help="the API key, or - to read it from standard input")
    pk_add.add_argument("--weight", type=int, default=1)
    pk_add.set_defaults(handler=_cmd_provider_key_add)
    pk_list = provider_key.add_parser("list", help="list provider keys (masked)")
    pk_list.add_argument("--provider", default=None)
    pk_list.set_defaults(handler=_cmd_provider_key_list)

    key = commands.add_parser("key", help="gateway keys for clients").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    key_create = key.add_parser("create", help="create a gateway key (printed once)")
    key_create.add_argument("--name", required=True)
    key_create.add_argument("--provider", required=True)
    key_create.add_argument(
        "--provider-keys", default=None, metavar="N1,N2", help="default: all of the provider's"
    )
    key_create.add_argument("--strategy", default="round_robin")
    key_create.add_argument("--retry-count", type=int, default=0)
    key_create.add_argument("--allowed-models", default=None, metavar="A,B")
    key_create.add_argument("--expires-at", default=None, metavar="ISO", help="ISO-8601; UTC when no offset")
    key_create.set_defaults(handler=_cmd_key_create)
    key.add_parser("list", help="list gateway keys (prefixes only)").set_defaults(handler=_cmd_key_list)

    usage = commands.add_parser("usage", help="the most recent requests")
    usage.add_argument("--last", type=int, default=20)
    usage.set_defaults(handler=_cmd_usage)
    return parser


# --- entry point --------------------------------------------------------------------------------------------


def _fail(kind: str, message: str, code: int) -> int:
    print(json.dumps({"error": {"type": kind, "message": message}}), file=sys.stderr)
    return code


def _database_message(exc: sa.exc.SQLAlchemyError) -> str:
    # Only the driver's own first line: SQLAlchemy's rendering appends the statement and its parameters.
    orig = getattr(exc, "orig", None)
    detail = (
        str(orig).strip().splitlines()[0] if orig is not None and str(orig).strip() else type(exc).__name__
    )
    return f"database error: {detail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    try:
        args = build_parser().parse_args(argv)
        settings = Settings.from_env()
        handler: Handler = args.handler
        result = handler(args, settings)
    except _UsageError as exc:
        return _fail("usage", str(exc), EXIT_BAD_INPUT)
    except ValidationError as exc:
        return _fail("validation", exc.message, EXIT_BAD_INPUT)
    except NotFoundError as exc:
        return _fail("not_found", exc.message, EXIT_BAD_INPUT)
    except ConflictError as exc:
        return _fail("conflict", exc.message, EXIT_BAD_INPUT)
    except TrioProxyError as exc:
        return _fail(type(exc).__name__, exc.message, EXIT_FAILURE)
    except sa.exc.SQLAlchemyError as exc:
        return _fail("database", _database_message(exc), EXIT_FAILURE)
    except OSError as exc:
        return _fail("os", f"{exc.strerror or type(exc).__name__}", EXIT_FAILURE)
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
