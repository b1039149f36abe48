"""Statistics queries on a large request log: overview, timeseries and groupings over 1,000,000 rows.

Usage::

    .venv/bin/python -m bench.stats_bench [--rows 1000000] [--days 30] [--runs 5] [--no-postgres]
                                          [--sqlite-path PATH] [--keep]

It migrates a fresh SQLite database (a temporary file unless ``--sqlite-path``) and, when the PostgreSQL server at
127.0.0.1:5432 is reachable, a fresh PostgreSQL database, bulk-loads the same generated rows into both (one
``executemany`` transaction on SQLite, ``COPY`` on PostgreSQL; then ``ANALYZE``), and times each query of
``trioproxy.store.statistics`` as the admin API calls it. It prints a Markdown table of the median (and min/max)
of ``--runs`` runs after one warm-up run.

The data: ``--rows`` requests spread evenly over the ``--days`` days before a fixed "now" (2026-11-01 12:00 UTC),
50 users owning 500 gateway keys, 3 providers, 8 models, 95 % successes, about 2 % without a price; costs are
exact decimals with up to 10 places.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import secrets
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from trioproxy.store import statistics as stats
from trioproxy.store.db import create_engine_for, run_migrations
from trioproxy.store.request_query import list_requests

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
TZ = "Europe/Berlin"
USERS = 50
KEYS = 500
MODELS = [
    ("openai", 1, "gpt-4o"),
    ("openai", 1, "gpt-4o-mini"),
    ("openai", 1, "o3-mini"),
    ("anthropic", 2, "claude-sonnet-4-5"),
    ("anthropic", 2, "claude-haiku-4-5"),
    ("gemini", 3, "gemini-2.5-pro"),
    ("gemini", 3, "gemini-2.5-flash"),
    ("gemini", 3, "gemini-2.0-flash"),
]
OUTCOMES = ["ok"] * 95 + ["upstream_error"] * 3 + ["client_cancelled", "upstream_died"]
COLUMNS = [
    "request_id",
    "started_at",
    "gateway_key_id",
    "provider_key_id",
    "user_id",
    "provider_id",
    "provider_kind",
    "route",
    "method",
    "path",
    "model",
    "stream",
    "status",
    "outcome",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "usage_reported",
    "usage_complete",
    "usage_partial",
    "cost_input",
    "cost_output",
    "cost_cache_read",
    "cost_cache_write",
    "cost_total",
    "price_missing",
    "ttfb_ms",
    "duration_ms",
    "attempts",
    "client_ip",
    "error",
]
PG_USERS = ("postgres", "root")


def _money(units: int) -> str:
    """Units of 1e-10 USD as the canonical decimal text ExactDecimal stores on SQLite ("0.0012", "3")."""
    whole, frac = divmod(units, 10**10)
    return f"{whole}.{frac:010d}".rstrip("0").rstrip(".")


def generate(rows: int, days: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    """Rows as tuples in COLUMNS order; timestamps as naive UTC datetimes, costs as decimal text."""
    rng = random.Random(seed)
    start = NOW - dt.timedelta(days=days)
    step = days * 86400 / rows
    for n in range(rows):
        kind, provider_id, model = MODELS[rng.randrange(len(MODELS))]
        key = rng.randrange(1, KEYS + 1)
        outcome = OUTCOMES[rng.randrange(len(OUTCOMES))]
        inp, out = rng.randrange(20, 4000), rng.randrange(0, 1500)
        cache = rng.randrange(0, 2000) if rng.random() < 0.3 else 0
        priced = rng.random() >= 0.02
        ci, co, cr = inp * 25_000, out * 100_000, cache * 12_500  # $2.50 / $10 / $1.25 per million tokens
        costs: list[str | None] = (
            [_money(ci), _money(co), _money(cr), "0", _money(ci + co + cr)] if priced else [None] * 5
        )
        duration = rng.uniform(50, 20_000)
        yield (
            f"{n:08x}-0000-4000-8000-{seed:012x}",
            (start + dt.timedelta(seconds=n * step + rng.random() * step)).replace(tzinfo=None),
            key,
            (key % 40) + 1,
            key % USERS + 1,
            provider_id,
            kind,
            f"{kind}.chat",
            "POST",
            "/v1/chat/completions",
            model,
            rng.random() < 0.6,
            200 if outcome == "ok" else 502,
            outcome,
            inp,
            out,
            cache,
            0,
            out // 10,
            True,
            outcome == "ok",
            outcome != "ok",
            *costs,
            not priced,
            duration * 0.2,
            duration,
            1,
            "10.0.0.1",
            None,
        )


def load_sqlite(engine: sa.Engine, rows: int, days: int) -> None:
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert isinstance(conn, sqlite3.Connection)
        placeholders = ", ".join("?" * len(COLUMNS))
        insert = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        fmt = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's SQLite DATETIME storage format
        conn.execute("BEGIN")
        batch: list[tuple[Any, ...]] = []
        for row in generate(rows, days):
            batch.append((row[0], row[1].strftime(fmt), *row[2:]))
            if len(batch) == 50_000:
                conn.executemany(insert, batch)
                batch.clear()
        conn.executemany(insert, batch)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        raw.close()


def load_postgres(url: str, rows: int, days: int) -> None:
    params = sa.make_url(url)
    with psycopg.connect(
        host=params.host, port=params.port, user=params.username, dbname=params.database, autocommit=False
    ) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in generate(rows, days):
                copy.write_row((row[0], row[1].replace(tzinfo=dt.UTC), *row[2:]))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE requests")


@contextlib.contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh database on 127.0.0.1:5432 for the run (dropped afterwards), or None when unreachable."""
    for user in PG_USERS:
        try:
            admin = psycopg.connect(
                host="127.0.0.1", port=5432, user=user, dbname="postgres", autocommit=True
            )
        except psycopg.OperationalError:
            continue
        name = f"trioproxy_bench_{os.getpid()}_{secrets.token_hex(3)}"
        with admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            try:
                yield f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}"
            finally:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        return
    yield None


def queries(days: int) -> list[tuple[str, Callable[[sa.Engine], Any]]]:
    week, month = NOW - dt.timedelta(days=7), NOW - dt.timedelta(days=days)
    user = 7
    return [
        ("overview, all users", lambda e: stats.overview(e, owner_id=None, now=NOW, tz=TZ)),
        ("overview, one user", lambda e: stats.overview(e, owner_id=user, now=NOW, tz=TZ)),
        (
            "timeseries hour, 7 days, all users",
            lambda e: stats.timeseries(e, owner_id=None, since=week, until=NOW, bucket="hour", tz=TZ),
        ),
        (
            f"timeseries day, {days} days, all users",
            lambda e: stats.timeseries(e, owner_id=None, since=month, until=NOW, bucket="day", tz=TZ),
        ),
        (
            f"timeseries day, {days} days, one user",
            lambda e: stats.timeseries(e, owner_id=user, since=month, until=NOW, bucket="day", tz=TZ),
        ),
        (
            "by model, 7 days, all users",
            lambda e: stats.by_model(e, owner_id=None, since=week, until=NOW),
        ),
        (
            f"by gateway key, {days} days, all users",
            lambda e: stats.by_key(e, owner_id=None, since=month, until=NOW),
        ),
        (
            "request log page 1 (50), one user",
            lambda e: list_requests(e, owner_id=user, page=1, page_size=50),
        ),
    ]


def measure(engine: sa.Engine, fn: Callable[[sa.Engine], Any], runs: int) -> list[float]:
    fn(engine)  # warm-up: caches, prepared plans
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(engine)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def bench(label: str, url: str, args: argparse.Namespace, table: list[str]) -> None:
    run_migrations(url)
    engine = create_engine_for(url)
    try:
        t0 = time.perf_counter()
        if engine.dialect.name == "sqlite":
            load_sqlite(engine, args.rows, args.days)
        else:
            load_postgres(url, args.rows, args.days)
        print(f"{label}: loaded {args.rows:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, fn in queries(args.days):
            times = measure(engine, fn, args.runs)
            table.append(
                f"| {label} | {name} | {statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} |"
            )
            print(table[-1], flush=True)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sqlite-path", type=Path, default=None)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary SQLite file")
    args = parser.parse_args()

    table = [
        "| database | query | median ms | min ms | max ms |",
        "|---|---|---:|---:|---:|",
    ]
    tmp = Path(tempfile.mkdtemp(prefix="trioproxy-stats-bench-"))
    try:
        path = args.sqlite_path or tmp / "bench.db"
        if path.exists():
            raise SystemExit(f"{path} exists; the benchmark needs a fresh database")
        bench(f"SQLite {sqlite3.sqlite_version}", f"sqlite:///{path}", args, table)
    finally:
        if args.keep:
            print(f"SQLite database kept at {path}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_postgres:
        with postgres_database() as pg_url:
            if pg_url is None:
                print("PostgreSQL at 127.0.0.1:5432 is not reachable; skipped")
            else:
                engine = create_engine_for(pg_url)
                with engine.connect() as conn:
                    version = conn.execute(sa.text("SHOW server_version")).scalar()
                engine.dispose()
                bench(f"PostgreSQL {version}", pg_url, args, table)

    print()
    print(
        f"{args.rows:,} request rows over {args.days} days; median of {args.runs} runs after a warm-up; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    print()
    print("\n".join(table))


if __name__ == "__main__":
    main()
