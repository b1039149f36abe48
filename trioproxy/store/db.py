"""Engines, transactions, migrations and the configuration version.

Both planes reach the database through :func:`create_engine_for`. SQLite (the embedded default) gets the
settings a small concurrent server needs: WAL so readers never block the writer, ``synchronous=NORMAL``
(durable at every checkpoint, and WAL cannot corrupt on power loss), a 5 s ``busy_timeout`` instead of instant
"database is locked", and foreign keys on. Transactions are opened by SQLAlchemy rather than by the sqlite3
module (SQLAlchemy's "serializable isolation / savepoints" recipe): reads use a deferred ``BEGIN`` so a
multi-statement read sees one consistent snapshot, writes use ``BEGIN IMMEDIATE`` so two writers queue on the
busy timeout up front instead of failing with SQLITE_BUSY when a read lock has to be upgraded half-way through
a transaction.

Every configuration write goes through :func:`config_session` (or calls :func:`bump_config_version` itself),
which increments ``config_version`` in the same transaction; the config reloader polls that single row.

Resource handling: engines own connection pools; callers :meth:`~sqlalchemy.engine.Engine.dispose` them.
Everything here is blocking: async callers run it in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session

from trioproxy.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from alembic.config import Config

# Execution option that marks a connection whose transactions will write (SQLite: BEGIN IMMEDIATE).
_WRITE_OPTION = "trioproxy_write"
# Key of pg_advisory_xact_lock taken while migrating, so two processes starting together migrate one at a
# time.
_MIGRATION_LOCK_ID = 0x7472696F  # "trio"
_SQLITE_BUSY_TIMEOUT_MS = 5000


def _normalize_url(url: str) -> sa.URL:
    parsed = make_url(url)
    # A bare postgresql:// URL would pick psycopg2, which we do not ship.
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine_for(url: str) -> Engine:
    """Create the engine for ``url`` (SQLite file or PostgreSQL), with the tuning described in the module doc.

    A SQLite database's directory is created when missing. ``postgresql://`` URLs are switched to psycopg 3.
    """
    try:
        parsed = _normalize_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError("the database URL is malformed") from exc
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(parsed)
    return sa.create_engine(parsed, pool_pre_ping=True)


def _create_sqlite_engine(url: sa.URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # Worker threads (trio.to_thread) share the pool, so connections must be usable from any thread; the pool
    # still hands each connection to one thread at a time.
    engine = sa.create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; the "begin" hook below issues BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, marked so its transactions are write transactions (``BEGIN IMMEDIATE`` on SQLite)."""
    return engine.execution_options(**{_WRITE_OPTION: True})


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A Core connection inside one write transaction; commits on success, rolls back on error."""
    with writer(engine).begin() as conn:
        yield conn


@contextlib.contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """An ORM session inside one write transaction; commits on success, rolls back on error."""
    with Session(writer(engine), expire_on_commit=False) as session, session.begin():
        yield session


@contextlib.contextmanager
def config_session(engine: Engine) -> Iterator[Session]:
    """A write session for a configuration change: the config version is bumped in the same transaction.

    The bump runs after the caller's block, so a block that raises changes nothing, the version included.
    """
    with write_session(engine) as session:
        yield session
        session.flush()
        bump_config_version(session)


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A Core connection inside one read transaction that sees a single consistent state of the database.

    PostgreSQL gets REPEATABLE READ (its READ COMMITTED gives every statement its own snapshot); SQLite's
    deferred BEGIN already pins the WAL snapshot at the first read.
    """
    bind = engine
    if engine.dialect.name == "postgresql":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    with bind.connect() as conn, conn.begin():
        yield conn


def bump_config_version(conn: Connection | Session) -> int:
    """Increment the configuration version inside the caller's transaction and return the new value.

    On PostgreSQL the row lock also serializes concurrent configuration writers until they commit.
    """
    from trioproxy.store.models import ConfigVersion

    table = cast(sa.Table, ConfigVersion.__table__)
    stmt = (
        sa.update(table).where(table.c.id == 1).values(version=table.c.version + 1).returning(table.c.version)
    )
    version = conn.execute(stmt).scalar_one_or_none()
    if version is None:
        raise StoreError("the config_version row is missing; run `trioproxy migrate`")
    return int(version)


def _alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    # Resolved from the installed package, so migrations work from any working directory.
    location = resources.files("migrations")
    cfg.set_main_option("script_location", str(location))
    return cfg


def run_migrations(url: str) -> None:
    """Upgrade the database at ``url`` to the newest schema (Alembic ``upgrade head``), in one transaction."""
    engine = create_engine_for(url)
    try:
        from alembic import command

        cfg = _alembic_config()
        with write_transaction(engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def migrations_current(engine: Engine) -> bool:
    """Whether the database's schema revision is the newest one this code knows."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(_alembic_config()).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
