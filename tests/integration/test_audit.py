"""The audit log on SQLite and PostgreSQL: written in the caller's transaction, masked, append-only, listed."""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.errors import ValidationError
from trioproxy.store.audit import is_secret_field, list_audit, mask_image, record_audit
from trioproxy.store.db import (
    _alembic_config,
    create_engine_for,
    migrations_current,
    run_migrations,
    write_session,
    write_transaction,
)
from trioproxy.store.models import User

PROVIDER_SECRET = "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAAAAAA1111"
GATEWAY_KEY = "tpk_0123456789abcdefghijABCDEFGHIJkl0a1b2c"
GOOGLE_KEY = "AIzaSyA1234567890abcdefghijklmnopqrstuv"
PASSWORD = "correct horse battery staple"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIiwidHlwIjoiYWNjZXNzIn0.c2lnbmF0dXJlc2lnbmF0dXJl"


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    run_migrations(db_url)
    engine = create_engine_for(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def audit(engine: sa.Engine, **fields: Any) -> None:
    values: dict[str, Any] = {
        "actor_id": 1,
        "actor_name": "admin",
        "action": "update",
        "object_type": "provider_key",
        "object_id": "5",
        "before": None,
        "after": None,
        "ip": "127.0.0.1",
    }
    values.update(fields)
    with write_session(engine) as session:
        record_audit(session, **values)


def raw_table(engine: sa.Engine) -> str:
    """Every stored audit value as text, the way a backup or a curious DBA would see it."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM audit_log")).all()
    return repr(rows)


def test_the_row_commits_and_rolls_back_with_the_change(engine: sa.Engine) -> None:
    with write_session(engine) as session:
        session.add(User(username="alice", role="user"))
        session.flush()
        record_audit(
            session,
            actor_id=None,
            actor_name="bootstrap",
            action="create",
            object_type="user",
            object_id="alice",
            before=None,
            after={"username": "alice", "password": PASSWORD},
            ip=None,
        )

    class Boom(Exception):
        pass

    def failing_change() -> None:
        with write_session(engine) as session:
            session.add(User(username="bob", role="user"))
            session.flush()
            record_audit(
                session,
                actor_id=1,
                actor_name="admin",
                action="create",
                object_type="user",
                object_id="bob",
                before=None,
                after={"username": "bob"},
                ip="10.0.0.1",
            )
            raise Boom

    with pytest.raises(Boom):
        failing_change()
    items, total = list_audit(engine, page=1, page_size=10)
    assert total == 1
    [row] = items
    assert (row["action"], row["object_type"], row["object_id"], row["actor_name"]) == (
        "create",
        "user",
        "alice",
        "bootstrap",
    )
    assert row["before"] is None
    assert row["after"] == {"username": "alice", "password": "…"}
    assert dt.datetime.fromisoformat(row["at"]).tzinfo is not None
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE username = 'bob'")).scalar() == 0
        # SQL NULL, not a JSON null, so "has no before image" is queryable.
        assert conn.execute(sa.text("SELECT count(*) FROM audit_log WHERE before IS NULL")).scalar() == 1


def test_secrets_never_reach_the_table(engine: sa.Engine) -> None:
    class Color(enum.Enum):
        RED = "red"

    before = {
        "name": "main",
        "secret": PROVIDER_SECRET,
        "secret_hint": "sk-…1111",
        "weight": 1,
        "headers": {"Authorization": f"Bearer {PROVIDER_SECRET}", "X-Goog-Api-Key": GOOGLE_KEY},
    }
    after = {
        "name": "main",
        "secret": "sk-proj-ZZZZZZZZZZZZZZZZZZZZZZZZZZZZ9999",
        "weight": 2,
        "budget": Decimal("12.50"),
        "expires_at": dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
        "color": Color.RED,
        "pool": [{"provider_key_id": 3, "api_key": GOOGLE_KEY}, {"apiKey": PROVIDER_SECRET}],
        "user": {"password": PASSWORD, "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$abc$def"},
        "notes": f"rotated because {GATEWAY_KEY} leaked, token {JWT}",
        "key": GATEWAY_KEY,
        "key_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "refresh_token": JWT,
        "raw": b"\x00\x01",
        "tags": {"b", "a"},
    }
    audit(engine, before=before, after=after, object_id=f"key {GATEWAY_KEY}")
    text = raw_table(engine)
    for secret in (
        PROVIDER_SECRET,
        GATEWAY_KEY,
        GOOGLE_KEY,
        PASSWORD,
        JWT,
        "ZZZZZZZZZZZZ",
        "argon2id",
        "9f86d08",
    ):
        assert secret not in text
    [row], _ = list_audit(engine, page=1, page_size=10)
    json.dumps(row)
    assert row["before"]["secret"] == "sk-…1111"
    assert row["before"]["secret_hint"] == "sk-…1111"  # a hint is already safe
    assert row["before"]["headers"] == {"Authorization": "Bea…1111", "X-Goog-Api-Key": "AIz…stuv"}
    a = row["after"]
    assert a["secret"] == "sk-…9999"
    assert (a["weight"], a["budget"], a["expires_at"], a["color"]) == (
        2,
        "12.50",
        "2027-01-01T00:00:00+00:00",
        "red",
    )
    assert a["pool"] == [{"provider_key_id": 3, "api_key": "AIz…stuv"}, {"apiKey": "sk-…1111"}]
    assert a["user"] == {"password": "…", "password_hash": "…"}
    assert a["notes"] == "rotated because tpk…1b2c leaked, token eyJ…dXJl"
    assert a["key"] == "tpk…1b2c"
    assert a["refresh_token"] == "eyJ…dXJl"
    assert a["raw"] == "<2 bytes>"
    assert a["tags"] == ["a", "b"]
    assert row["object_id"] == "key tpk…1b2c"


def test_the_table_is_append_only(engine: sa.Engine) -> None:
    audit(engine, after={"name": "x"})
    for statement in ("UPDATE audit_log SET action = 'nothing'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), write_transaction(engine) as conn:
            conn.execute(sa.text(statement))
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), write_transaction(engine) as conn:
            conn.execute(sa.text("TRUNCATE audit_log"))
    [row], total = list_audit(engine, page=1, page_size=10)
    assert (row["action"], total) == ("update", 1)


def test_list_filters_pages_and_order(engine: sa.Engine) -> None:
    for n in range(6):
        audit(
            engine,
            actor_id=1 + n % 2,
            action=("create", "update", "delete")[n % 3],
            object_type="user" if n < 3 else "gateway_key",
            object_id=str(n),
        )
    everything, total = list_audit(engine, page=1, page_size=100)
    assert total == 6
    assert [item["object_id"] for item in everything] == ["5", "4", "3", "2", "1", "0"]  # newest first
    page2, total = list_audit(engine, page=2, page_size=4)
    assert ([item["object_id"] for item in page2], total) == (["1", "0"], 6)

    def only(**filters: Any) -> list[str]:
        items, count = list_audit(engine, page=1, page_size=100, **filters)
        assert count == len(items)
        return [item["object_id"] for item in items]

    assert only(actor_id=2) == ["5", "3", "1"]
    assert only(object_type="user") == ["2", "1", "0"]
    assert only(action="delete") == ["5", "2"]
    assert only(action="delete", object_type="gateway_key", actor_id=2) == ["5"]
    stamps = [dt.datetime.fromisoformat(item["at"]) for item in everything]
    assert only(since=stamps[2]) == ["5", "4", "3"]  # since inclusive
    assert only(until=stamps[2]) == ["2", "1", "0"]  # until exclusive
    assert only(since=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)) == []


def test_bad_arguments(engine: sa.Engine) -> None:
    with pytest.raises(ValidationError):
        list_audit(engine, page=0, page_size=10)
    with pytest.raises(ValidationError):
        list_audit(engine, page=1, page_size=100_000)
    with pytest.raises(ValidationError):
        list_audit(engine, page=1, page_size=10, since=dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="action"):
        audit(engine, action="")
    with pytest.raises(ValueError, match="longer"):
        audit(engine, ip="x" * 65)
    with pytest.raises(TypeError, match="object"):
        audit(engine, after={"what": object()})
    assert list_audit(engine, page=1, page_size=10) == ([], 0)


def test_migration_0002_downgrades_and_upgrades(db_url: str) -> None:
    run_migrations(db_url)
    engine = create_engine_for(db_url)
    try:
        cfg = _alembic_config()
        with write_transaction(engine) as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        assert "audit_log" not in sa.inspect(engine).get_table_names()
        assert not migrations_current(engine)
        run_migrations(db_url)
        assert migrations_current(engine)
        audit(engine, after={"ok": True})
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), write_transaction(engine) as conn:
            conn.execute(sa.text("DELETE FROM audit_log"))
    finally:
        engine.dispose()


# --- masking (pure) -----------------------------------------------------------------------------------------


def test_secret_field_names() -> None:
    for name in (
        "secret",
        "Password",
        "password_hash",
        "key",
        "key_hash",
        "token",
        "api_key",
        "Authorization",
        "x-api-key",
        "x-goog-api-key",
        "refresh_token",
        "apiKey",
        "clientSecret",
        "secret_ciphertext",
        "new_password",
    ):
        assert is_secret_field(name), name
    for name in (
        "secret_hint",
        "key_prefix",
        "token_version",
        "max_tokens",
        "input_tokens",
        "gateway_key_id",
        "provider_key_ids",
        "name",
        "keys",
    ):
        assert not is_secret_field(name), name


SECRET_NAMES = st.sampled_from(
    ["secret", "password", "api_key", "authorization", "x-api-key", "token", "key_hash"]
)
PLAIN_NAMES = st.sampled_from(["name", "weight", "headers", "pool", "items", "note", "enabled"])
SECRETS = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=12, max_size=60)


@st.composite
def images(draw: st.DrawFn) -> tuple[Any, list[str]]:
    """A nested JSON-like value with secrets planted under secret-looking names, and the secrets."""
    planted: list[str] = []

    def node(depth: int) -> Any:
        kind = draw(st.integers(0, 3 if depth < 3 else 1))
        if kind == 0:
            return draw(
                st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(["a", "ok", "gpt-4o"]))
            )
        if kind == 1:
            secret = draw(SECRETS)
            planted.append(secret)
            return {draw(SECRET_NAMES): secret}
        if kind == 2:
            return [node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        return {draw(PLAIN_NAMES) + str(i): node(depth + 1) for i in range(draw(st.integers(0, 3)))}

    return node(0), planted


@given(images())
def test_masking_never_keeps_a_planted_secret(image: tuple[Any, list[str]]) -> None:
    value, planted = image
    masked = mask_image(value)
    text = json.dumps(masked, ensure_ascii=False)
    for secret in planted:
        # A hint shows at most 3 leading and 4 trailing characters, never a whole 12-character secret.
        assert secret not in text


@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["a", "name", "weight", "x"]), inner, max_size=3)
        ),
    )
)
def test_masking_leaves_harmless_values_alone(value: Any) -> None:
    assert mask_image(value) == value
