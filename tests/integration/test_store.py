"""The store on real databases: every test here runs on SQLite and on PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from trioproxy.crypto import SecretBox
from trioproxy.errors import ConfigError, ConflictError, NotFoundError, ValidationError
from trioproxy.gateway_keys import has_valid_checksum, hash_gateway_key
from trioproxy.pricing import SEED_PRICES, ModelPrice, PriceTier
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.settings import UpstreamSettings
from trioproxy.snapshot import Origin, ProviderKind
from trioproxy.store import provisioning as prov
from trioproxy.store.db import (
    bump_config_version,
    config_session,
    create_engine_for,
    migrations_current,
    run_migrations,
)
from trioproxy.store.models import Base, User
from trioproxy.store.prices import load_prices, seed_prices_if_empty, upsert_price
from trioproxy.store.request_log import insert_request_records, recent_requests
from trioproxy.store.snapshot_loader import load_snapshot, read_config_version

SECRET_A = "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAAAAAA1111"
SECRET_B = "sk-proj-BBBBBBBBBBBBBBBBBBBBBBBBBBBB2222"
SECRET_C = "sk-ant-CCCCCCCCCCCCCCCCCCCCCCCCCCCC3333"
DEFAULTS = UpstreamSettings()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    run_migrations(db_url)
    engine = create_engine_for(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(bytes(range(32)))


def version(engine: sa.Engine) -> int:
    return read_config_version(engine)


def setup_two_providers(engine: sa.Engine, box: SecretBox) -> None:
    prov.add_provider(
        engine, name="oa", kind="openai", base_url="https://api.openai.com/v1", allow_private=False
    )
    prov.add_provider(
        engine, name="an", kind="anthropic", base_url="https://api.anthropic.com", allow_private=False
    )
    prov.add_provider_key(engine, box, provider="oa", name="a", secret=SECRET_A)
    prov.add_provider_key(engine, box, provider="oa", name="b", secret=SECRET_B, weight=3)
    prov.add_provider_key(engine, box, provider="an", name="c", secret=SECRET_C)


# --- migrations ---------------------------------------------------------------------------------------------


def test_migrations_from_empty_and_idempotent(db_url: str) -> None:
    engine = create_engine_for(db_url)
    try:
        assert not migrations_current(engine)
        run_migrations(db_url)
        assert migrations_current(engine)
        run_migrations(db_url)  # a second run is a no-op
        assert migrations_current(engine)
        tables = set(sa.inspect(engine).get_table_names())
        assert {
            "users",
            "providers",
            "provider_keys",
            "gateway_keys",
            "gateway_key_pool",
            "requests",
            "model_prices",
            "config_version",
            "alembic_version",
        } <= tables
        assert read_config_version(engine) == 1
    finally:
        engine.dispose()


def test_models_match_the_migration(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_sqlite_database_directory_is_created(sqlite_url: str) -> None:
    path = Path(sa.make_url(sqlite_url).database or "")
    assert not path.parent.exists()
    run_migrations(sqlite_url)
    assert path.exists()


def test_sqlite_connection_pragmas(sqlite_url: str) -> None:
    engine = create_engine_for(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()


# --- config version -----------------------------------------------------------------------------------------


def test_every_configuration_write_bumps_the_version(engine: sa.Engine, box: SecretBox) -> None:
    writes = [
        lambda: prov.create_user(engine, username="alice"),
        lambda: prov.add_provider(
            engine, name="oa", kind="openai", base_url="https://api.openai.com/v1", allow_private=False
        ),
        lambda: prov.add_provider_key(engine, box, provider="oa", name="a", secret=SECRET_A, owner_id=1),
        lambda: prov.add_provider_key(engine, box, provider="oa", name="b", secret=SECRET_B),
        lambda: prov.create_gateway_key(engine, name="g", provider="oa"),
        lambda: prov.set_gateway_key_pool(engine, 1, ["b"]),
        lambda: prov.set_gateway_key_enabled(engine, 1, False),
        lambda: prov.set_provider_key_enabled(engine, "a", False, provider="oa"),
        lambda: prov.set_provider_enabled(engine, "oa", False),
        lambda: prov.set_user_enabled(engine, 1, False),
        lambda: upsert_price(engine, SEED_PRICES[0]),
        lambda: prov.delete_provider_key(engine, "a", provider="oa"),
        lambda: prov.delete_gateway_key(engine, 1),
        lambda: prov.delete_provider(engine, "oa"),
    ]
    for step, write in enumerate(writes):
        before = version(engine)
        write()
        assert version(engine) == before + 1, f"write {step} did not bump the version exactly once"


def test_failed_writes_leave_the_version_alone(engine: sa.Engine, box: SecretBox) -> None:
    setup_two_providers(engine, box)
    before = version(engine)
    with pytest.raises(ConflictError):
        prov.add_provider(engine, name="oa", kind="openai", base_url="https://x.example", allow_private=False)
    with pytest.raises(ConflictError):
        prov.add_provider_key(engine, box, provider="oa", name="a", secret=SECRET_A)
    with pytest.raises(ValidationError):
        prov.add_provider(engine, name="x", kind="openai", base_url="http://10.0.0.1", allow_private=False)
    with pytest.raises(NotFoundError):
        prov.add_provider_key(engine, box, provider="nope", name="z", secret=SECRET_A)

    def abort_after_a_write() -> None:
        with config_session(engine) as session:
            session.add(User(username="ghost"))
            session.flush()
            raise ConflictError("abort")

    with pytest.raises(ConflictError):
        abort_after_a_write()
    assert version(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0


def test_bump_helper_returns_the_new_version(engine: sa.Engine) -> None:
    with config_session(engine) as session:
        assert bump_config_version(session) == 2
    assert version(engine) == 3  # the helper's bump plus config_session's own


def test_concurrent_writers_all_succeed(engine: sa.Engine) -> None:
    before = version(engine)
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for n in range(10):
                prov.add_provider(
                    engine,
                    name=f"{tag}-{n}",
                    kind="openai",
                    base_url="https://api.openai.com/v1",
                    allow_private=False,
                )
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("x", "y", "z")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert version(engine) == before + 30
    assert len(prov.list_providers(engine)) == 30


# --- provisioning -------------------------------------------------------------------------------------------


def test_secrets_are_encrypted_at_rest_and_never_returned(engine: sa.Engine, box: SecretBox) -> None:
    result = prov.add_provider_key(
        engine,
        box,
        provider=prov.add_provider(
            engine, name="oa", kind="openai", base_url="https://api.openai.com", allow_private=False
        )["id"],
        name="a",
        secret=SECRET_A,
    )
    assert SECRET_A not in json.dumps(result)
    assert result["secret_hint"] == "sk-…1111"
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM provider_keys")).mappings().one()
    assert row["secret_ciphertext"].startswith("v1:")
    assert all(SECRET_A not in str(value) for value in row.values())
    assert "AAAAAAAA" not in row["secret_ciphertext"]
    assert SECRET_A not in json.dumps(prov.list_provider_keys(engine))


def test_gateway_key_is_returned_once_and_stored_hashed(engine: sa.Engine, box: SecretBox) -> None:
    setup_two_providers(engine, box)
    created = prov.create_gateway_key(engine, name="g", provider="oa")
    key = created["key"]
    assert has_valid_checksum(key)
    assert created["provider_keys"] == ["a", "b"]  # defaults to all of the provider's keys
    assert created["prefix"] == key[:12] + "…"
    assert "key_hash" not in created
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM gateway_keys")).mappings().one()
    assert row["key_hash"] == hash_gateway_key(key)
    assert all(key not in str(value) for value in row.values())
    listed = json.dumps(prov.list_gateway_keys(engine))
    assert key not in listed
    assert hash_gateway_key(key) not in listed


def test_pool_rejects_keys_of_another_provider(engine: sa.Engine, box: SecretBox) -> None:
    setup_two_providers(engine, box)
    before = version(engine)
    with pytest.raises(ConflictError):
        prov.create_gateway_key(engine, name="g", provider="oa", provider_keys=["a", "c"])
    with pytest.raises(ConflictError):
        prov.create_gateway_key(engine, name="g", provider="oa", provider_keys=[3])  # "c" by id
    with pytest.raises(NotFoundError):
        prov.create_gateway_key(engine, name="g", provider="oa", provider_keys=["missing"])
    assert version(engine) == before
    assert prov.list_gateway_keys(engine) == []
    created = prov.create_gateway_key(engine, name="g", provider="oa", provider_keys=["b", "a"])
    with pytest.raises(ConflictError):
        prov.set_gateway_key_pool(engine, created["id"], ["c"])
    assert prov.list_gateway_keys(engine)[0]["provider_keys"] == ["b", "a"]


def test_validation_errors(engine: sa.Engine, box: SecretBox) -> None:
    with pytest.raises(ValidationError):
        prov.add_provider(engine, name="p", kind="cohere", base_url="https://x.example", allow_private=False)
    with pytest.raises(ValidationError):
        prov.add_provider(engine, name=" ", kind="openai", base_url="https://x.example", allow_private=False)
    with pytest.raises(ValidationError):
        prov.add_provider(
            engine,
            name="p",
            kind="openai",
            base_url="https://x.example",
            headers={"Authorization": "Bearer sk-leak"},
            allow_private=False,
        )
    with pytest.raises(ValidationError):
        prov.add_provider(
            engine,
            name="p",
            kind="openai",
            base_url="https://x.example",
            headers={"X-Ok": "a\r\nX-Injected: b"},
            allow_private=False,
        )
    with pytest.raises(ValidationError):
        prov.add_provider(
            engine,
            name="p",
            kind="openai",
            base_url="https://x.example",
            total_timeout=-1,
            allow_private=False,
        )
    prov.add_provider(
        engine, name="local", kind="openai", base_url="http://127.0.0.1:8000", allow_private=True
    )
    with pytest.raises(ValidationError):
        prov.add_provider_key(engine, box, provider="local", name="k", secret="has space")
    with pytest.raises(ValidationError):
        prov.add_provider_key(engine, box, provider="local", name="k", secret="sk-x", weight=-1)
    with pytest.raises(ValidationError):
        prov.create_gateway_key(engine, name="g", provider="local", retry_count=-1)
    with pytest.raises(ValidationError):
        prov.create_gateway_key(engine, name="g", provider="local", expires_at=dt.datetime(2030, 1, 1))
    with pytest.raises(ValidationError):
        prov.create_gateway_key(engine, name="g", provider="local", strategy="Round Robin")
    with pytest.raises(NotFoundError):
        prov.create_gateway_key(engine, name="g", provider="local", owner_id=99)


def test_timestamps_are_aware_utc(engine: sa.Engine) -> None:
    created = prov.add_provider(
        engine, name="oa", kind="openai", base_url="https://api.openai.com", allow_private=False
    )
    stamp = dt.datetime.fromisoformat(created["created_at"])
    assert stamp.utcoffset() == dt.timedelta(0)
    listed = prov.list_providers(engine)[0]
    assert dt.datetime.fromisoformat(listed["created_at"]) == stamp


def test_delete_rules(engine: sa.Engine, box: SecretBox) -> None:
    setup_two_providers(engine, box)
    created = prov.create_gateway_key(engine, name="g", provider="oa")
    with pytest.raises(ConflictError):
        prov.delete_provider(engine, "oa")
    prov.delete_provider_key(engine, "a", provider="oa")
    assert prov.list_gateway_keys(engine)[0]["provider_keys"] == ["b"]  # the pool row went with the key
    prov.delete_gateway_key(engine, created["id"])
    prov.delete_provider(engine, "oa")
    assert [p["name"] for p in prov.list_providers(engine)] == ["an"]
    assert [k["name"] for k in prov.list_provider_keys(engine)] == ["c"]  # "b" cascaded with its provider


# --- snapshot -----------------------------------------------------------------------------------------------


def test_snapshot_contents(engine: sa.Engine, box: SecretBox) -> None:
    prov.add_provider(
        engine,
        name="oa",
        kind="openai",
        base_url="http://127.0.0.1:8081/proxy/v1/",
        headers={"OpenAI-Organization": "org-1"},
        first_byte_timeout=12.5,
        allow_private=True,
    )
    prov.add_provider_key(engine, box, provider="oa", name="a", secret=SECRET_A)
    prov.add_provider_key(engine, box, provider="oa", name="b", secret=SECRET_B, weight=3)
    expires = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    created = prov.create_gateway_key(
        engine,
        name="g",
        provider="oa",
        provider_keys=["b", "a"],
        retry_count=2,
        allowed_models=["gpt-4o", "gpt-5"],
        expires_at=expires,
        total_timeout=30,
    )
    snap = load_snapshot(engine, box, DEFAULTS)
    assert snap.version == read_config_version(engine)
    (provider,) = snap.providers.values()
    assert provider.kind is ProviderKind.OPENAI
    assert provider.origin == Origin("http", "127.0.0.1", 8081)
    assert provider.path_prefix == "/proxy/v1"
    assert provider.extra_headers == (("OpenAI-Organization", "org-1"),)
    assert provider.first_byte_timeout == 12.5
    assert provider.connect_timeout == DEFAULTS.connect_timeout
    assert provider.total_timeout == DEFAULTS.total_timeout
    assert {k.name: k.secret for k in snap.provider_keys.values()} == {"a": SECRET_A, "b": SECRET_B}
    assert {k.name: k.weight for k in snap.provider_keys.values()} == {"a": 1, "b": 3}
    assert SECRET_A not in repr(snap)
    view = snap.gateway_keys[hash_gateway_key(created["key"])]
    ids = {k.name: k.id for k in snap.provider_keys.values()}
    assert view.pool == (ids["b"], ids["a"])
    assert view.enabled
    assert view.retry_count == 2
    assert view.allowed_models == ("gpt-4o", "gpt-5")
    assert view.expires_at == expires.timestamp()
    assert view.total_timeout == 30.0
    assert view.first_byte_timeout is None
    assert view.prefix == created["prefix"]


def test_disabled_owner_or_provider_disables_keys(engine: sa.Engine, box: SecretBox) -> None:
    user = prov.create_user(engine, username="bob")
    prov.add_provider(
        engine, name="oa", kind="openai", base_url="https://api.openai.com", allow_private=False
    )
    prov.add_provider_key(engine, box, provider="oa", name="owned", secret=SECRET_A, owner_id=user["id"])
    prov.add_provider_key(engine, box, provider="oa", name="shared", secret=SECRET_B)
    owned = prov.create_gateway_key(engine, name="bob's", provider="oa", owner_id=user["id"])
    unowned = prov.create_gateway_key(engine, name="ops", provider="oa")

    def states() -> tuple[bool, bool, dict[str, bool]]:
        snap = load_snapshot(engine, box, DEFAULTS)
        return (
            snap.gateway_keys[hash_gateway_key(owned["key"])].enabled,
            snap.gateway_keys[hash_gateway_key(unowned["key"])].enabled,
            {k.name: k.enabled for k in snap.provider_keys.values()},
        )

    assert states() == (True, True, {"owned": True, "shared": True})
    prov.set_user_enabled(engine, user["id"], False)
    assert states() == (False, True, {"owned": False, "shared": True})
    prov.set_user_enabled(engine, user["id"], True)
    assert states() == (True, True, {"owned": True, "shared": True})
    prov.set_provider_enabled(engine, "oa", False)
    assert states()[:2] == (False, False)
    prov.set_provider_enabled(engine, "oa", True)
    prov.set_gateway_key_enabled(engine, unowned["id"], False)
    assert states()[:2] == (True, False)


def test_snapshot_drops_hand_made_cross_provider_pool_rows(engine: sa.Engine, box: SecretBox) -> None:
    setup_two_providers(engine, box)
    created = prov.create_gateway_key(engine, name="g", provider="oa", provider_keys=["a"])
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO gateway_key_pool (gateway_key_id, provider_key_id, position) VALUES (:g, 3, 0)"
            ),
            {"g": created["id"]},
        )
    view = load_snapshot(engine, box, DEFAULTS).gateway_keys[hash_gateway_key(created["key"])]
    assert view.pool == (1,)


def test_snapshot_with_the_wrong_master_key_fails_cleanly(engine: sa.Engine, box: SecretBox) -> None:
    setup_two_providers(engine, box)
    with pytest.raises(ConfigError) as info:
        load_snapshot(engine, SecretBox(bytes(32)), DEFAULTS)
    assert "sk-" not in str(info.value)


# --- prices -------------------------------------------------------------------------------------------------


def test_seed_and_load_prices(engine: sa.Engine, box: SecretBox) -> None:
    before = version(engine)
    assert seed_prices_if_empty(engine) == len(SEED_PRICES)
    assert version(engine) == before + 1
    assert seed_prices_if_empty(engine) == 0
    assert version(engine) == before + 1
    with engine.connect() as conn:
        loaded = load_prices(conn)
    assert sorted(loaded, key=lambda p: (p.provider_kind, p.model)) == sorted(
        SEED_PRICES, key=lambda p: (p.provider_kind, p.model)
    )
    snap = load_snapshot(engine, box, DEFAULTS)
    price = snap.prices.resolve(ProviderKind.GEMINI, "gemini-2.5-pro")
    assert price is not None
    assert price.tiers
    assert price.tiers[0].min_input_tokens == 200_000


def test_upsert_price_inserts_then_replaces(engine: sa.Engine) -> None:
    price = ModelPrice(
        model="my-model",
        provider_kind=ProviderKind.OPENAI,
        input_per_million=Decimal("0.1234567891"),
        output_per_million=Decimal("2"),
        cache_read_per_million=None,
        cache_write_per_million=Decimal("0.5"),
        tiers=(PriceTier(1000, Decimal("0.3"), Decimal("4"), None, None),),
    )
    upsert_price(engine, price)
    cheaper = ModelPrice(
        model="my-model",
        provider_kind=ProviderKind.OPENAI,
        input_per_million=Decimal("0.05"),
        output_per_million=Decimal("1"),
        cache_read_per_million=None,
        cache_write_per_million=None,
    )
    with engine.connect() as conn:
        assert [p for p in load_prices(conn) if p.model == "my-model"] == [price]
    upsert_price(engine, cheaper)
    with engine.connect() as conn:
        assert [p for p in load_prices(conn) if p.model == "my-model"] == [cheaper]


# --- request log --------------------------------------------------------------------------------------------


def make_record(n: int, *, cost: bool = True) -> RequestRecord:
    return RequestRecord(
        request_id=f"00000000-0000-4000-8000-{n:012d}",
        started_at=1_800_000_000.25 + n,
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="127.0.0.1",
        gateway_key_id=1,
        provider_key_id=2,
        user_id=None,
        provider_id=3,
        provider_kind="openai",
        model="gpt-4o",
        stream=True,
        status=200,
        outcome=Outcome.OK,
        usage=Usage(
            input_tokens=1200,
            output_tokens=340,
            cache_read_tokens=1024,
            reasoning_tokens=12,
            reported=True,
            complete=True,
        ),
        cost=CostBreakdown(
            input=Decimal("0.003"),
            output=Decimal("0.0034"),
            cache_read=Decimal("0.00128"),
            cache_write=Decimal("0"),
        )
        if cost
        else None,
        price_missing=not cost,
        ttfb_ms=81.5,
        duration_ms=1234.0,
        attempts=1,
    )


def test_insert_request_records_is_idempotent(engine: sa.Engine) -> None:
    records = [make_record(n, cost=n % 2 == 0) for n in range(5)]
    assert insert_request_records(engine, records) == 5
    assert insert_request_records(engine, records) == 0
    assert insert_request_records(engine, [*records, make_record(5)]) == 1
    assert insert_request_records(engine, []) == 0
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM requests")).scalar() == 6


def test_recent_requests_newest_first_and_json_ready(engine: sa.Engine) -> None:
    insert_request_records(engine, [make_record(n, cost=n != 1) for n in range(3)])
    rows = recent_requests(engine, last=2)
    assert [row["request_id"][-1] for row in rows] == ["2", "1"]
    json.dumps(rows)  # JSON-ready
    newest, priceless = rows
    assert Decimal(newest["cost_total"]) == Decimal("0.00768")
    assert Decimal(newest["cost_input"]) == Decimal("0.003")
    assert priceless["cost_total"] is None
    assert priceless["price_missing"] is True
    assert newest["usage_complete"] is True
    assert newest["input_tokens"] == 1200
    assert newest["outcome"] == "ok"
    stamp = dt.datetime.fromisoformat(newest["started_at"])
    assert stamp.timestamp() == 1_800_000_002.25
    assert recent_requests(engine, last=0) == []
