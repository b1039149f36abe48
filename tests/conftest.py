"""Shared fixtures: database URLs for SQLite and for the real PostgreSQL server on 127.0.0.1:5432.

PostgreSQL tests get a schema of their own inside one database created for the test session (and dropped at
its end), so they are isolated and fast. When the server is not reachable they are skipped, except under
``CI=true``, where a missing database is a failure: CI must never pass by skipping the PostgreSQL half.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, settings
from psycopg import sql

from tests.redis_support import delete_prefix, require_redis

# Property tests: a quick default locally, many more examples in CI (CI=true), never a deadline on shared cores.
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DB = "test"
PG_USERS = ("postgres", "root")


def _connect_admin() -> tuple[psycopg.Connection[tuple[object, ...]], str]:
    errors = []
    for user in PG_USERS:
        try:
            conn = psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname=PG_ADMIN_DB, connect_timeout=3, autocommit=True
            )
        except psycopg.OperationalError as exc:
            errors.append(f"{user}: {str(exc).strip().splitlines()[0]}")
            continue
        return conn, user
    message = f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable ({'; '.join(errors)})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def _postgres_database() -> Iterator[tuple[str, str]]:
    """(user, database name) of a database created for this test session."""
    admin, user = _connect_admin()
    name = f"trioproxy_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield user, name
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def postgres_url(_postgres_database: tuple[str, str]) -> Iterator[str]:
    """A SQLAlchemy URL whose connections see only a fresh, empty schema of their own."""
    user, database = _postgres_database
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{database}?options=-csearch_path%3D{schema}"
        finally:
            # A test that leaked a connection idle in a transaction must not hang the run: give up after a
            # while and leave the schema to the DROP DATABASE ... WITH (FORCE) at the end of the session.
            conn.execute("SET lock_timeout = '5s'")
            with contextlib.suppress(psycopg.errors.LockNotAvailable):
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file in a directory that does not exist yet (the engine must create it)."""
    return f"sqlite:///{tmp_path / 'data' / 'trioproxy.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs twice: on SQLite and on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def redis_url() -> str:
    """The real Redis at 127.0.0.1:6379 (skipped when down, a failure under CI=true)."""
    return require_redis()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"trioproxy-test:{secrets.token_hex(8)}"
    yield prefix
    with trio.move_on_after(5, shield=True):
        await delete_prefix(redis_url, prefix)
