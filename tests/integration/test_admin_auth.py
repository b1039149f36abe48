"""Admin authentication: login, refresh, logout, me, password change, the negative JWT corpus, throttling and
the bootstrap administrator."""

from __future__ import annotations

import base64
import json
import random
import statistics
import time
import warnings
from pathlib import Path

import argon2
import jwt
import pytest
import sqlalchemy as sa
import trio
from hypothesis import given
from hypothesis import strategies as st

from admin.auth import (
    AUDIENCE,
    ISSUER,
    LoginThrottle,
    ThrottleRules,
    TokenKind,
    TokenService,
    bootstrap_admin,
    jwt_key_for,
)
from admin.errors import ApiError
from tests.integration.admin_support import ADMIN_PASSWORD, USER_PASSWORD, AdminClient, admin_app
from trioproxy.errors import ConfigError
from trioproxy.store.users import ensure_bootstrap_admin

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "invalid or expired token"}}


async def _me(client: AdminClient, token: str) -> int:
    return (await client.call("GET", "/api/auth/me", token=token)).status


# --- the happy path and revocation --------------------------------------------------------------------------


async def test_login_me_refresh_logout(tmp_path: Path, db_url: str) -> None:
    async with admin_app(tmp_path, db_url) as client:
        reply = await client.login("admin", ADMIN_PASSWORD)
        assert reply.status == 200
        body = reply.json
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 900
        assert body["user"]["username"] == "admin"
        assert body["user"]["role"] == "super_admin"
        assert "password_hash" not in reply.body.decode()
        access, refresh = body["access_token"], body["refresh_token"]

        me = await client.call("GET", "/api/auth/me", token=access)
        assert me.status == 200
        assert me.json["user"]["id"] == body["user"]["id"]
        assert "manage_users" in me.json["permissions"]

        # A refresh token is never an access token, and an access token never refreshes.
        assert await _me(client, refresh) == 401
        bad = await client.call("POST", "/api/auth/refresh", json_body={"refresh_token": access})
        assert bad.status == 401

        renewed = await client.call("POST", "/api/auth/refresh", json_body={"refresh_token": refresh})
        assert renewed.status == 200
        new_access = renewed.json["access_token"]
        assert await _me(client, new_access) == 200

        assert (await client.call("POST", "/api/auth/logout", token=new_access)).status == 204
        # Logging out revokes every token the user holds: old and new, access and refresh.
        for token in (access, new_access):
            assert await _me(client, token) == 401
        again = await client.call("POST", "/api/auth/refresh", json_body={"refresh_token": refresh})
        assert again.status == 401
        assert await _me(client, await client.token()) == 200


async def test_password_change_revokes_and_returns_new_tokens(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        admin = await client.token()
        _, token = await client.make_user(admin, "carol", "user")
        wrong = await client.call(
            "POST",
            "/api/auth/password",
            token=token,
            json_body={"current_password": "not the password", "new_password": "a brand new password"},
        )
        assert wrong.status == 403
        short = await client.call(
            "POST",
            "/api/auth/password",
            token=token,
            json_body={"current_password": USER_PASSWORD, "new_password": "short"},
        )
        assert short.status == 422
        changed = await client.call(
            "POST",
            "/api/auth/password",
            token=token,
            json_body={"current_password": USER_PASSWORD, "new_password": "a brand new password"},
        )
        assert changed.status == 200
        assert await _me(client, token) == 401
        assert await _me(client, changed.json["access_token"]) == 200
        assert (await client.login("carol", USER_PASSWORD)).status == 401
        assert (await client.login("carol", "a brand new password")).status == 200


async def test_passwords_are_argon2id_and_upgraded_on_login(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        engine = client.state.engine
        with engine.connect() as conn:
            stored = conn.execute(
                sa.text("SELECT password_hash FROM users WHERE username = 'admin'")
            ).scalar_one()
        assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        assert ADMIN_PASSWORD not in stored
        weak = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(ADMIN_PASSWORD)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE users SET password_hash = :h WHERE username = 'admin'"), {"h": weak})
        assert (await client.login("admin", ADMIN_PASSWORD)).status == 200
        with engine.connect() as conn:
            upgraded = conn.execute(
                sa.text("SELECT password_hash FROM users WHERE username = 'admin'")
            ).scalar_one()
        assert upgraded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


# --- the negative JWT corpus --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _claims(user_id: int, *, typ: str = "access", ver: int = 0, **overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(user_id),
        "iat": now,
        "exp": now + 600,
        "jti": "x" * 32,
        "typ": typ,
        "ver": ver,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _quiet_encode(claims: dict[str, object], key: bytes, algorithm: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # a 256-bit key for HS512
        return jwt.encode(claims, key, algorithm=algorithm)


def _corpus(key: bytes, user_id: int) -> dict[str, str]:
    good = _claims(user_id)
    header_none = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(good).encode())
    valid = jwt.encode(good, key, algorithm="HS256")
    head, body, signature = valid.split(".")
    other_user = _b64(json.dumps(_claims(user_id + 1000)).encode())
    corpus = {
        "alg none": f"{header_none}.{payload}.",
        "alg none with signature": f"{header_none}.{payload}.{signature}",
        "HS512 with the right key": _quiet_encode(good, key, "HS512"),
        "HS384 with the right key": _quiet_encode(good, key, "HS384"),
        "bad signature": jwt.encode(good, b"k" * 32, algorithm="HS256"),
        "stripped signature": f"{head}.{body}.",
        "tampered payload": f"{head}.{other_user}.{signature}",
        "expired beyond leeway": jwt.encode(
            _claims(user_id, iat=int(time.time()) - 4000, exp=int(time.time()) - 31), key, algorithm="HS256"
        ),
        "issued in the future": jwt.encode(
            _claims(user_id, iat=int(time.time()) + 3600, exp=int(time.time()) + 7200), key, algorithm="HS256"
        ),
        "refresh as access": jwt.encode(_claims(user_id, typ="refresh"), key, algorithm="HS256"),
        "unknown typ": jwt.encode(_claims(user_id, typ="id"), key, algorithm="HS256"),
        "wrong issuer": jwt.encode(_claims(user_id, iss="someone-else"), key, algorithm="HS256"),
        "wrong audience": jwt.encode(_claims(user_id, aud="trioproxy-proxy"), key, algorithm="HS256"),
        "old token version": jwt.encode(_claims(user_id, ver=-1), key, algorithm="HS256"),
        "non-numeric sub": jwt.encode(_claims(user_id, sub="admin"), key, algorithm="HS256"),
        "unknown user": jwt.encode(_claims(999_999), key, algorithm="HS256"),
        "boolean version": jwt.encode(_claims(user_id, ver=False), key, algorithm="HS256"),
        "garbage": "not-a-jwt",
        "huge": "a" * 5000,
    }
    for claim in ("exp", "iat", "sub", "iss", "aud", "jti", "typ", "ver"):
        without = {name: value for name, value in _claims(user_id).items() if name != claim}
        corpus[f"missing {claim}"] = jwt.encode(without, key, algorithm="HS256")
    return corpus


def _mutants(token: str, count: int, rng: random.Random) -> list[str]:
    """Byte mutations of ``token`` that change what it decodes to (a flipped padding bit decodes the same)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    original = [_unb64(part) for part in token.split(".")]
    mutants: list[str] = []
    while len(mutants) < count:
        position = rng.randrange(len(token))
        mutant = token[:position] + rng.choice(alphabet) + token[position + 1 :]
        parts = mutant.split(".")
        try:
            if len(parts) == 3 and [_unb64(part) for part in parts] == original:
                continue
        except ValueError:
            pass
        mutants.append(mutant)
    return mutants


async def test_negative_jwt_corpus(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        admin_token = await client.token()
        user_id, user_token = await client.make_user(admin_token, "dave", "user")
        key = jwt_key_for(client.state.settings)
        corpus = _corpus(key, user_id)
        corpus.update({f"mutant {n}": m for n, m in enumerate(_mutants(user_token, 300, random.Random(7)))})
        accepted = []
        for name, token in corpus.items():
            reply = await client.call("GET", "/api/auth/me", headers={"Authorization": f"Bearer {token}"})
            if reply.status != 401 or reply.json != UNAUTHORIZED:
                accepted.append((name, reply.status))
        assert accepted == []
        assert len(corpus) >= 300
        for header in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {user_token}"}):
            missing = await client.call("GET", "/api/auth/me", headers=header)
            assert missing.status == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")

        # The same token is accepted until its user is disabled, then deleted.
        assert await _me(client, user_token) == 200
        patched = await client.call(
            "PATCH", f"/api/users/{user_id}", token=admin_token, json_body={"enabled": False}
        )
        assert patched.status == 200
        assert await _me(client, user_token) == 401
        await client.call("PATCH", f"/api/users/{user_id}", token=admin_token, json_body={"enabled": True})
        fresh = await client.token("dave", USER_PASSWORD)
        assert await _me(client, fresh) == 200
        assert (await client.call("DELETE", f"/api/users/{user_id}", token=admin_token)).status == 204
        reply = await client.call("GET", "/api/auth/me", token=fresh)
        assert (reply.status, reply.json) == (401, UNAUTHORIZED)


async def test_role_change_revokes_tokens(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        admin_token = await client.token()
        user_id, token = await client.make_user(admin_token, "erin", "user")
        await client.call(
            "PATCH", f"/api/users/{user_id}", token=admin_token, json_body={"role": "read_only"}
        )
        assert await _me(client, token) == 401


def test_tokens_expire_and_keep_their_kind() -> None:
    key = b"k" * 32
    service = TokenService(key)
    token = service.issue(1, 0, TokenKind.ACCESS)
    assert service.decode(token, TokenKind.ACCESS).user_id == 1
    with pytest.raises(ApiError):
        service.decode(token, TokenKind.REFRESH)
    issued_long_ago = TokenService(key, clock=lambda: time.time() - 3600)
    with pytest.raises(ApiError):
        service.decode(issued_long_ago.issue(1, 0, TokenKind.ACCESS), TokenKind.ACCESS)
    # Expired 10 s ago: within the 30 s leeway for clock skew between instances.
    just_expired = TokenService(key, clock=lambda: time.time() - 910)
    assert service.decode(just_expired.issue(1, 0, TokenKind.ACCESS), TokenKind.ACCESS).user_id == 1
    with pytest.raises(ValueError):
        TokenService(b"short")


# --- throttling ---------------------------------------------------------------------------------------------


def test_throttle_locks_after_free_failures_and_doubles() -> None:
    throttle = LoginThrottle(ThrottleRules(free_failures=3, max_delay=60, window=600))
    now = 100.0
    for _ in range(3):
        assert throttle.wait_time("Alice", "ip", now) == 0
        throttle.failure("alice", now)
    assert throttle.wait_time("ALICE", "ip", now) == pytest.approx(1.0)
    assert throttle.wait_time("alice", "ip", now + 1.0) == 0
    throttle.failure("alice", now + 1.0)
    assert throttle.wait_time("alice", "ip", now + 1.0) == pytest.approx(2.0)
    throttle.success("alice")
    assert throttle.wait_time("alice", "ip", now + 1.0) == 0
    # Failures older than the window are forgotten.
    for _ in range(3):
        throttle.failure("bob", now)
    assert throttle.wait_time("bob", "ip", now + 601) == 0


def test_throttle_hard_cap_needs_an_unlock() -> None:
    throttle = LoginThrottle(ThrottleRules(free_failures=1, hard_cap=5, max_delay=10, window=60))
    for n in range(5):
        throttle.failure("x", float(n))
    assert throttle.wait_time("x", "ip", 10_000.0) == 10  # the window does not forgive a hard-capped account
    throttle.unlock("x")
    assert throttle.wait_time("x", "ip", 10_000.0) == 0


@given(st.lists(st.floats(min_value=0, max_value=200), min_size=1, max_size=60))
def test_throttle_per_address_window(offsets: list[float]) -> None:
    rules = ThrottleRules(ip_attempts=5, ip_window=60)
    throttle = LoginThrottle(rules)
    times = sorted(offsets)
    for now in times:
        wait = throttle.wait_time("anyone", "10.0.0.1", now)
        assert wait >= 0
        if wait == 0:
            throttle.attempt("10.0.0.1", now)
    # Never more than ip_attempts admitted within any window.
    admitted = list(throttle._addresses["10.0.0.1"])
    for index, start in enumerate(admitted):
        assert sum(1 for t in admitted[index:] if t - start < 60) <= 5


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(ThrottleRules(max_tracked=50))
    for n in range(500):
        throttle.failure(f"user{n}", 1.0)
        throttle.attempt(f"10.0.{n // 256}.{n % 256}", 1.0)
    assert len(throttle._accounts) == 50
    assert len(throttle._addresses) == 50


async def test_login_throttle_same_answers_for_unknown_and_known_users(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        client.state.throttle = LoginThrottle(ThrottleRules(free_failures=3, ip_attempts=1000))
        wrong = await client.login("admin", "wrong password!!")
        unknown = await client.login("nobody", "wrong password!!")
        assert (
            (wrong.status, wrong.json)
            == (unknown.status, unknown.json)
            == (
                401,
                {"error": {"code": "unauthorized", "message": "invalid username or password"}},
            )
        )
        for name in ("admin", "nobody"):
            for _ in range(2):
                await client.login(name, "wrong password!!")
            locked = await client.login(name, "wrong password!!")
            assert locked.status == 429, name
            assert locked.json["error"]["code"] == "too_many_requests"
            assert int(locked.headers["retry-after"]) >= 1
        # Locked means locked: the right password is refused too, until an administrator unlocks.
        assert (await client.login("admin", ADMIN_PASSWORD)).status == 429
        client.state.throttle.unlock("admin")
        assert (await client.login("admin", ADMIN_PASSWORD)).status == 200


async def test_login_timing_does_not_reveal_usernames(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        client.state.throttle = LoginThrottle(ThrottleRules(free_failures=1000, ip_attempts=1000))

        async def timed(username: str) -> float:
            start = time.perf_counter()
            await client.login(username, "wrong password!!")
            return time.perf_counter() - start

        known = [await timed("admin") for _ in range(5)]
        unknown = [await timed(f"ghost{n}") for n in range(5)]
        # Both paths run one argon2 verification (tens of ms); without the dummy verify the unknown path
        # would be about a hundred times faster.
        assert statistics.median(unknown) > 0.5 * statistics.median(known)


async def test_login_throttle_per_address(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        client.state.throttle = LoginThrottle(ThrottleRules(ip_attempts=4, free_failures=100))
        statuses = [
            (await client.login(f"user{n}", "wrong password!!", remote_addr="198.51.100.7")).status
            for n in range(6)
        ]
        assert statuses == [401, 401, 401, 401, 429, 429]
        # Another address is not affected.
        assert (await client.login("admin", ADMIN_PASSWORD, remote_addr="198.51.100.8")).status == 200


async def test_unlock_route(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        client.state.throttle = LoginThrottle(ThrottleRules(free_failures=1, ip_attempts=1000))
        admin_token = await client.token()
        user_id, _ = await client.make_user(admin_token, "frank", "user")
        await client.login("frank", "wrong password!!")
        assert (await client.login("frank", USER_PASSWORD)).status == 429
        assert (await client.call("POST", f"/api/users/{user_id}/unlock", token=admin_token)).status == 204
        assert (await client.login("frank", USER_PASSWORD)).status == 200


# --- bootstrap ----------------------------------------------------------------------------------------------


async def test_bootstrap_with_the_configured_password(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        assert client.announced == []
        assert (await client.login("admin", ADMIN_PASSWORD)).status == 200
        # A second start finds users and creates nobody.
        assert (
            await trio.to_thread.run_sync(ensure_bootstrap_admin, client.state.engine, "another password!!")
            is None
        )
        with client.state.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one() == 1


async def test_bootstrap_generates_a_password_printed_once(tmp_path: Path) -> None:
    async with admin_app(tmp_path, admin_password=None) as client:
        assert len(client.announced) == 1
        message = client.announced[0]
        password = message.split("password ", 1)[1].split(" ", 1)[0]
        assert len(password) >= 20
        assert (await client.login("admin", password)).status == 200
        await bootstrap_admin(client.state, client.announced.append)
        assert len(client.announced) == 1


def test_bootstrap_refuses_a_short_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ensure_bootstrap_admin(sa.create_engine("sqlite://"), "short")
