"""Admin resources: CRUD, tenancy, schemas, errors, secrets, audit, config versions, permissions."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from admin.app import create_app, parse_cors_origins
from admin.rbac import Access, route_table
from tests.integration.admin_support import AdminClient, Reply, admin_app
from trioproxy.errors import ConfigError
from trioproxy.gateway_keys import hash_gateway_key
from trioproxy.settings import UpstreamSettings
from trioproxy.store.snapshot_loader import load_snapshot

SECRET_A = "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAAAAAA1111"
SECRET_B = "sk-proj-BBBBBBBBBBBBBBBBBBBBBBBBBBBB2222"
SECRET_SHARED = "sk-proj-SSSSSSSSSSSSSSSSSSSSSSSSSSSS3333"
SECRET_ROTATED = "sk-proj-RRRRRRRRRRRRRRRRRRRRRRRRRRRR4444"


def _count(client: AdminClient, sql: str) -> int:
    with client.state.engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def _version(client: AdminClient) -> int:
    return _count(client, "SELECT version FROM config_version WHERE id = 1")


async def _provider(client: AdminClient, token: str, name: str = "oa", kind: str = "openai") -> int:
    reply = await client.call(
        "POST",
        "/api/providers",
        token=token,
        json_body={"name": name, "kind": kind, "base_url": "https://api.example.com"},
    )
    assert reply.status == 201, reply.body
    return int(reply.json["id"])


async def _provider_key(
    client: AdminClient, token: str, provider_id: int, name: str, secret: str, **extra: Any
) -> Reply:
    return await client.call(
        "POST",
        "/api/provider-keys",
        token=token,
        json_body={"provider_id": provider_id, "name": name, "secret": secret, **extra},
    )


# --- tenancy ------------------------------------------------------------------------------------------------


async def test_users_see_and_change_only_their_own_keys(tmp_path: Path, db_url: str) -> None:
    async with admin_app(tmp_path, db_url) as client:
        admin = await client.token()
        provider = await _provider(client, admin)
        alice_id, alice = await client.make_user(admin, "alice", "user")
        _, bob = await client.make_user(admin, "bob", "user")
        _, operator = await client.make_user(admin, "olga", "operator")

        pk = await _provider_key(client, alice, provider, "alice-key", SECRET_A)
        assert pk.status == 201
        assert pk.json["owner_id"] == alice_id
        pk_id = pk.json["id"]
        gk = await client.call(
            "POST", "/api/keys", token=alice, json_body={"name": "alice-app", "provider_id": provider}
        )
        assert gk.status == 201
        assert gk.json["provider_key_ids"] == [pk_id]
        gk_id = gk.json["id"]

        # Bob: another owner's objects answer exactly like missing ones.
        for method, path, body in (
            ("GET", f"/api/provider-keys/{pk_id}", None),
            ("PATCH", f"/api/provider-keys/{pk_id}", {"weight": 5}),
            ("DELETE", f"/api/provider-keys/{pk_id}", None),
            ("POST", f"/api/provider-keys/{pk_id}/test", None),
            ("GET", f"/api/keys/{gk_id}", None),
            ("PATCH", f"/api/keys/{gk_id}", {"enabled": False}),
            ("POST", f"/api/keys/{gk_id}/regenerate", None),
            ("DELETE", f"/api/keys/{gk_id}", None),
        ):
            theirs = await client.call(method, path, token=bob, json_body=body)
            missing = await client.call(
                method,
                path.replace(str(pk_id), "99999").replace(str(gk_id), "99999"),
                token=bob,
                json_body=body,
            )
            assert theirs.status == 404, (method, path)
            assert theirs.json["error"]["code"] == missing.json["error"]["code"] == "not_found"
        assert (await client.call("GET", "/api/provider-keys", token=bob)).json["total"] == 0
        assert (await client.call("GET", "/api/keys", token=bob)).json["total"] == 0
        # Bob cannot pool Alice's key either.
        stolen = await client.call(
            "POST",
            "/api/keys",
            token=bob,
            json_body={"name": "b", "provider_id": provider, "provider_key_ids": [pk_id]},
        )
        assert stolen.status == 404

        # Alice sees her own; the operator sees everything but changes nothing of hers; the admin changes all.
        assert (await client.call("GET", "/api/keys", token=alice)).json["total"] == 1
        assert (await client.call("GET", f"/api/keys/{gk_id}", token=operator)).status == 200
        assert (
            await client.call("PATCH", f"/api/keys/{gk_id}", token=operator, json_body={"enabled": False})
        ).status == 403
        assert (await client.call("GET", "/api/provider-keys", token=operator)).json["total"] == 1
        assert (
            await client.call("PATCH", f"/api/keys/{gk_id}", token=admin, json_body={"name": "renamed"})
        ).status == 200
        assert (await client.call("DELETE", f"/api/keys/{gk_id}", token=alice)).status == 204
        assert (await client.call("DELETE", f"/api/provider-keys/{pk_id}", token=alice)).status == 204


async def test_pool_holds_only_keys_the_owner_may_use(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        admin = await client.token()
        openai = await _provider(client, admin)
        anthropic = await _provider(client, admin, "an", "anthropic")
        alice_id, alice = await client.make_user(admin, "alice", "user")
        bob_id, bob = await client.make_user(admin, "bob", "user")
        shared = await _provider_key(client, admin, openai, "shared", SECRET_SHARED, owner_id=None)
        assert shared.status == 201
        assert shared.json["owner_id"] is None
        own = (await _provider_key(client, alice, openai, "alice", SECRET_A)).json["id"]
        bobs = (await _provider_key(client, bob, openai, "bob", SECRET_B)).json["id"]
        other_provider = (
            await _provider_key(client, alice, anthropic, "alice-an", "sk-ant-xxxxxxxxxxxxxxxxxxxxxx")
        ).json["id"]

        default = await client.call(
            "POST", "/api/keys", token=alice, json_body={"name": "d", "provider_id": openai}
        )
        assert default.json["provider_key_ids"] == [shared.json["id"], own]  # shared and own, never Bob's
        wrong_provider = await client.call(
            "POST",
            "/api/keys",
            token=alice,
            json_body={"name": "w", "provider_id": openai, "provider_key_ids": [other_provider]},
        )
        assert wrong_provider.status == 409
        # An administrator may see Bob's key, but still cannot put it in Alice's pool.
        for_alice = await client.call(
            "POST",
            "/api/keys",
            token=admin,
            json_body={"name": "x", "provider_id": openai, "owner_id": alice_id, "provider_key_ids": [bobs]},
        )
        assert for_alice.status == 409
        ok = await client.call(
            "PATCH", f"/api/keys/{default.json['id']}", token=alice, json_body={"provider_key_ids": [own]}
        )
        assert ok.status == 200
        assert ok.json["provider_key_ids"] == [own]
        del bob_id


async def test_roles_cannot_escalate(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        root = await client.token()
        admin_id, admin = await client.make_user(root, "adam", "admin")
        assert (
            await client.call(
                "POST", "/api/users", token=admin, json_body={"username": "evil", "role": "super_admin"}
            )
        ).status == 403
        assert (
            await client.call("PATCH", "/api/users/1", token=admin, json_body={"enabled": False})
        ).status == 403
        assert (
            await client.call(
                "PATCH", f"/api/users/{admin_id}", token=admin, json_body={"role": "super_admin"}
            )
        ).status == 403
        assert (await client.call("DELETE", f"/api/users/{admin_id}", token=admin)).status == 409
        assert (
            await client.call("PATCH", f"/api/users/{admin_id}", token=admin, json_body={"enabled": False})
        ).status == 409
        user_id, user = await client.make_user(admin, "uma", "user")
        assert (
            await client.call("PATCH", f"/api/users/{user_id}", token=user, json_body={"role": "admin"})
        ).status == 403
        # A user cannot give itself a budget, an owner or limits through any door.
        provider = await _provider(client, root)
        limited = await client.call(
            "POST",
            "/api/keys",
            token=user,
            json_body={"name": "k", "provider_id": provider, "budget": "1000"},
        )
        assert limited.status == 403
        for_other = await client.call(
            "POST",
            "/api/keys",
            token=user,
            json_body={"name": "k", "provider_id": provider, "owner_id": admin_id},
        )
        assert for_other.status == 403
        mine = await client.call(
            "POST", "/api/keys", token=user, json_body={"name": "k", "provider_id": provider}
        )
        assert mine.status == 201
        lift = await client.call(
            "PATCH", f"/api/keys/{mine.json['id']}", token=user, json_body={"rpm_limit": None}
        )
        assert lift.status == 403
        set_by_admin = await client.call(
            "PATCH",
            f"/api/keys/{mine.json['id']}",
            token=admin,
            json_body={"budget": "12.50", "budget_period": "monthly"},
        )
        assert set_by_admin.status == 200
        assert set_by_admin.json["budget"] == "12.5" or set_by_admin.json["budget"].startswith("12.5")
        # api_only keys work on the proxy but the role cannot use the admin API.
        _, api_only = await client.make_user(root, "api", "api_only")
        assert (await client.call("GET", "/api/keys", token=api_only)).status == 403
        assert (await client.call("GET", "/api/auth/me", token=api_only)).status == 200


# --- schemas and errors -------------------------------------------------------------------------------------


async def test_unknown_fields_and_bad_bodies_are_refused(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        admin = await client.token()
        provider = await _provider(client, admin)
        key = (
            await client.call(
                "POST", "/api/keys", token=admin, json_body={"name": "k", "provider_id": provider}
            )
        ).json
        user_id, _ = await client.make_user(admin, "ursula", "user")
        cases = [
            ("POST", "/api/users", {"username": "x", "password": "y" * 12, "is_admin": True}),
            ("PATCH", f"/api/users/{user_id}", {"password_hash": "$argon2id$..."}),
            ("PATCH", f"/api/users/{user_id}", {"token_version": 0}),
            (
                "POST",
                "/api/providers",
                {"name": "p", "kind": "openai", "base_url": "https://a.example", "owner_id": 1},
            ),
            ("PATCH", f"/api/providers/{provider}", {"kind": "gemini"}),
            (
                "POST",
                "/api/provider-keys",
                {"provider_id": provider, "name": "n", "secret": "sk-x", "secret_ciphertext": "v1:x"},
            ),
            ("PATCH", f"/api/keys/{key['id']}", {"owner_id": user_id}),
            ("PATCH", f"/api/keys/{key['id']}", {"provider_id": provider}),
            ("PATCH", f"/api/keys/{key['id']}", {"key_hash": "0" * 64}),
            (
                "POST",
                "/api/prices",
                {
                    "provider_kind": "openai",
                    "model": "m",
                    "input_per_million": 1,
                    "output_per_million": 1,
                    "x": 1,
                },
            ),
            ("POST", "/api/auth/login", {"username": "admin", "password": "p", "role": "super_admin"}),
        ]
        for method, path, body in cases:
            reply = await client.call(method, path, token=admin, json_body=body)
            assert reply.status == 422, (method, path, reply.status)
            assert reply.json["error"]["code"] == "validation_error"
        # The refused values are not echoed back.
        secretish = await client.call(
            "POST", "/api/users", token=admin, json_body={"username": "x", "password": 12345678901234}
        )
        assert secretish.status == 422
        assert "12345678901234" not in secretish.body.decode()

        malformed = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert (malformed.status, malformed.json["error"]["code"]) == (400, "bad_request")
        deep = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            data=b"[" * 5000 + b"]" * 5000,
            headers={"Content-Type": "application/json"},
        )
        assert deep.status == 400
        not_object = await client.call("POST", "/api/providers", token=admin, json_body=[1, 2])
        assert not_object.status == 422
        nan = await client.call(
            "POST",
            "/api/prices",
            token=admin,
            data=b'{"provider_kind":"openai","model":"m","input_per_million":NaN,"output_per_million":1}',
            headers={"Content-Type": "application/json"},
        )
        assert nan.status == 400
        too_big = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            data=b'{"name":"' + b"a" * (1024 * 1024) + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert (too_big.status, too_big.json["error"]["code"]) == (413, "request_entity_too_large")
        for path in (
            "/api/nowhere",
            "/api/keys/0",
            "/api/keys/-1",
            "/api/keys/99999999999999",
            "/api/keys/abc",
        ):
            reply = await client.call("GET", path, token=admin)
            assert (reply.status, reply.json["error"]["code"]) == (404, "not_found"), path
        wrong_method = await client.call("PUT", "/api/keys", token=admin, json_body={})
        assert wrong_method.status == 405
        assert wrong_method.json["error"]["code"] == "method_not_allowed"
        # Semantic checks of the service layer are 422 too, conflicts 409.
        dup = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            json_body={"name": "oa", "kind": "openai", "base_url": "https://b.example"},
        )
        assert dup.status == 409
        bad_header = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            json_body={
                "name": "h",
                "kind": "openai",
                "base_url": "https://b.example",
                "headers": {"Authorization": "Bearer sk-leak"},
            },
        )
        assert bad_header.status == 422
        in_use = await client.call("DELETE", f"/api/providers/{provider}", token=admin)
        assert in_use.status == 409
        for reply in client.seen:
            assert reply.headers["content-type"].startswith("application/json") or reply.status == 204
            assert "Traceback" not in reply.body.decode()


async def test_ssrf_guard_on_base_urls(tmp_path: Path) -> None:
    async with admin_app(tmp_path, allow_private_upstreams=False) as client:
        admin = await client.token()
        refused = [
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:8080",
            "http://[::1]:80",
            "http://10.0.0.5",
            "http://[::ffff:169.254.169.254]",
            "http://0x7f000001",
            "http://2130706433",
            "http://user:pw@api.example.com",
            "file:///etc/passwd",
            "gopher://api.example.com",
            "https://api.example.com/?key=x",
        ]
        for n, url in enumerate(refused):
            reply = await client.call(
                "POST",
                "/api/providers",
                token=admin,
                json_body={"name": f"p{n}", "kind": "openai", "base_url": url},
            )
            assert reply.status == 422, url
        ok = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            json_body={"name": "ok", "kind": "openai", "base_url": "https://api.openai.com"},
        )
        assert ok.status == 201
        patched = await client.call(
            "PATCH",
            f"/api/providers/{ok.json['id']}",
            token=admin,
            json_body={"base_url": "http://169.254.169.254"},
        )
        assert patched.status == 422
    async with admin_app(tmp_path / "private", allow_private_upstreams=True) as client:
        admin = await client.token()
        local = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            json_body={"name": "l", "kind": "openai", "base_url": "http://127.0.0.1:11434"},
        )
        assert local.status == 201
        metadata = await client.call(
            "POST",
            "/api/providers",
            token=admin,
            json_body={"name": "m", "kind": "openai", "base_url": "http://169.254.169.254"},
        )
        assert metadata.status == 422


async def test_pagination_is_capped(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        admin = await client.token()
        for n in range(5):
            await _provider(client, admin, f"p{n}")
        page = await client.call("GET", "/api/providers?page=2&page_size=2", token=admin)
        assert {k: page.json[k] for k in ("total", "page", "page_size")} == {
            "total": 5,
            "page": 2,
            "page_size": 2,
        }
        assert [p["name"] for p in page.json["items"]] == ["p2", "p3"]
        huge = await client.call("GET", "/api/providers?page_size=1000000000", token=admin)
        assert huge.status in (200, 422)
        capped = await client.call("GET", "/api/providers?page_size=1000", token=admin)
        assert capped.json["page_size"] == 100
        past = await client.call("GET", "/api/providers?page=99", token=admin)
        assert past.json["items"] == []
        assert (await client.call("GET", "/api/providers?page=0", token=admin)).status == 422
        prices = await client.call("GET", "/api/prices?page_size=5&provider_kind=openai", token=admin)
        assert prices.status == 200
        assert prices.json["total"] > 0
        assert all(item["provider_kind"] == "openai" for item in prices.json["items"])


# --- secrets, audit, config versions ------------------------------------------------------------------------


async def test_secrets_never_leave_and_every_write_is_audited_once(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_app(tmp_path, db_url) as client:
        admin = await client.token()
        created_keys: list[str] = []
        secrets = [SECRET_A, SECRET_ROTATED, "a brand new password", "user password 1234"]

        async def write(
            method: str, path: str, body: Any = None, *, bumps: bool = True, token: str = admin
        ) -> Reply:
            version, audits = _version(client), _count(client, "SELECT count(*) FROM audit_log")
            reply = await client.call(method, path, token=token, json_body=body)
            assert reply.status in (200, 201, 204), (method, path, reply.body)
            assert _count(client, "SELECT count(*) FROM audit_log") == audits + 1, (method, path)
            assert _version(client) == version + (1 if bumps else 0), (method, path)
            if "key" in (reply.json if reply.status != 204 else {}):
                created_keys.append(reply.json["key"])
            return reply

        user = await write(
            "POST", "/api/users", {"username": "sam", "password": "user password 1234", "role": "user"}
        )
        await write(
            "PATCH",
            f"/api/users/{user.json['id']}",
            {"password": "a brand new password", "email": "sam@example.com"},
        )
        # Nothing listens on port 9: the key test below fails fast, and is still a (non-config) audited write.
        provider = await write(
            "POST", "/api/providers", {"name": "oa", "kind": "openai", "base_url": "http://127.0.0.1:9"}
        )
        pid = provider.json["id"]
        await write(
            "PATCH", f"/api/providers/{pid}", {"timeouts": {"connect": 3}, "headers": {"X-Team": "a"}}
        )
        pk = await write("POST", "/api/provider-keys", {"provider_id": pid, "name": "k", "secret": SECRET_A})
        assert pk.json["secret_hint"] == "sk-…1111"
        await write("PATCH", f"/api/provider-keys/{pk.json['id']}", {"secret": SECRET_ROTATED, "weight": 3})
        gk = await write("POST", "/api/keys", {"name": "g", "provider_id": pid})
        await write(
            "PATCH",
            f"/api/keys/{gk.json['id']}",
            {"allowed_models": ["gpt-4o"], "expires_at": "2099-01-01T00:00:00Z"},
        )
        await write("POST", f"/api/keys/{gk.json['id']}/regenerate")
        price = await write(
            "POST",
            "/api/prices",
            {
                "provider_kind": "openai",
                "model": "m-1",
                "input_per_million": "0.1",
                "output_per_million": "0.4",
                "tiers": [
                    {"min_input_tokens": 1000, "input_per_million": "0.2", "output_per_million": "0.8"}
                ],
            },
        )
        assert price.json["tiers"][0]["input_per_million"] == "0.2"
        await write("PATCH", f"/api/prices/{price.json['id']}", {"output_per_million": "0.5"})
        await write("DELETE", f"/api/prices/{price.json['id']}")
        await write("POST", f"/api/provider-keys/{pk.json['id']}/test", bumps=False)
        await write("POST", f"/api/users/{user.json['id']}/unlock", bumps=False)
        await write("DELETE", f"/api/keys/{gk.json['id']}")
        await write("DELETE", f"/api/provider-keys/{pk.json['id']}")
        await write("DELETE", f"/api/providers/{pid}")
        await write("DELETE", f"/api/users/{user.json['id']}")
        await write("POST", "/api/auth/logout", bumps=False)

        assert len(created_keys) == 2
        secrets += created_keys
        # The full gateway key appears only in the answer that created it.
        for key in created_keys:
            assert sum(key in r.body.decode() for r in client.seen) == 1
        bodies = client.all_bodies(skip=lambda r: any(k in r.body.decode() for k in created_keys))
        with client.state.engine.connect() as conn:
            audit_rows = json.dumps(
                [dict(row) for row in conn.execute(sa.text("SELECT * FROM audit_log")).mappings()],
                default=str,
            )
            user_rows = json.dumps(
                [dict(row) for row in conn.execute(sa.text("SELECT * FROM users")).mappings()], default=str
            )
        for secret in secrets:
            assert secret not in bodies, secret
            assert secret not in audit_rows, secret
            assert secret not in caplog.text, secret
            assert secret not in user_rows, secret
        with client.state.engine.connect() as conn:
            trail = conn.execute(
                sa.text("SELECT action, object_type, actor_name FROM audit_log ORDER BY id")
            ).all()
        assert [(a, o) for a, o, _ in trail[-19:]] == [
            ("create", "user"),
            ("update", "user"),
            ("create", "provider"),
            ("update", "provider"),
            ("create", "provider_key"),
            ("update", "provider_key"),
            ("create", "gateway_key"),
            ("update", "gateway_key"),
            ("regenerate", "gateway_key"),
            ("create", "price"),
            ("update", "price"),
            ("delete", "price"),
            ("test", "provider_key"),
            ("unlock", "user"),
            ("delete", "gateway_key"),
            ("delete", "provider_key"),
            ("delete", "provider"),
            ("delete", "user"),
            ("logout", "user"),
        ]
        assert {actor for _, _, actor in trail[-19:]} == {"admin"}


# --- roles, permissions, documentation, CORS ----------------------------------------------------------------


async def test_roles_endpoint(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        reply = await client.call("GET", "/api/roles", token=await client.token())
        assert reply.status == 200
        names = {role["name"] for role in reply.json["roles"]}
        assert {"super_admin", "admin", "operator", "user", "read_only", "api_only"} <= names
        assert len(reply.json["permissions"]) >= 17
        read_only = next(role for role in reply.json["roles"] if role["name"] == "read_only")
        assert not any(p.startswith("manage_") for p in read_only["permissions"])


def _fill(rule: str) -> str:
    return (
        rule.replace("<id:user_id>", "999999")
        .replace("<id:provider_id>", "999999")
        .replace("<id:key_id>", "999999")
        .replace("<id:price_id>", "999999")
    )


async def test_openapi_document_describes_every_route(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        doc = await client.call("GET", "/api/openapi.json")
        assert doc.status == 200
        paths = doc.json["paths"]
        for route in route_table(client.app):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route.rule)
            assert route.method.lower() in paths[path], route
            operation = paths[path][route.method.lower()]
            assert "401" in {str(k) for k in operation["responses"]} or route.requirement is Access.PUBLIC
        login = paths["/api/auth/login"]["post"]
        assert login["security"] == []
        assert doc.json["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        shown = set(doc.json["components"]["schemas"]["ProviderKeyOut"]["properties"])
        assert "secret_hint" in shown
        assert not shown & {"secret", "secret_ciphertext", "key_hash"}
        docs = await client.call("GET", "/api/docs")
        assert docs.status == 200
        assert b"swagger" in docs.body.lower()


async def test_cors_is_off_by_default_and_exact_when_configured(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        reply = await client.call(
            "OPTIONS",
            "/api/keys",
            headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in reply.headers
    async with admin_app(
        tmp_path / "cors", admin_cors_origins="https://ui.example, http://localhost:5173"
    ) as client:
        preflight = await client.call(
            "OPTIONS",
            "/api/keys",
            headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        assert "Origin" in preflight.headers["vary"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        for origin in ("https://evil.example", "null", "https://ui.example.evil.com"):
            reply = await client.call("GET", "/api/roles", headers={"Origin": origin})
            assert "access-control-allow-origin" not in reply.headers
        actual = await client.call(
            "GET", "/api/roles", headers={"Origin": "http://localhost:5173"}, token=await client.token()
        )
        assert actual.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert actual.headers["cache-control"] == "no-store"
    for bad in ("*", "null", "https://ui.example/path", "ui.example"):
        with pytest.raises(ConfigError):
            parse_cors_origins(bad)


def test_every_route_declares_its_access(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from quart import Blueprint

    from admin import app as app_module

    undeclared = Blueprint("undeclared", __name__)

    @undeclared.get("/api/open")
    async def open_route() -> str:
        return "oops"

    monkeypatch.setitem(sys.modules, "tests_undeclared_routes", SimpleNamespace(bp=undeclared))
    monkeypatch.setattr(app_module, "ROUTE_MODULES", (*app_module.ROUTE_MODULES, "tests_undeclared_routes"))
    with pytest.raises(RuntimeError, match="/api/open"):
        create_app(SimpleNamespace())  # type: ignore[arg-type]


async def test_snapshot_drops_foreign_pool_keys_and_keys_of_owners_without_the_kind(
    tmp_path: Path, db_url: str
) -> None:
    """The write path refuses these; a hand-edited database must not get them past the snapshot either."""
    async with admin_app(tmp_path, db_url) as client:
        admin = await client.token()
        provider = await _provider(client, admin)
        alice_id, alice = await client.make_user(admin, "alice", "user")
        bob_id, bob = await client.make_user(admin, "bob", "user")
        alice_key = (await _provider_key(client, alice, provider, "a", SECRET_A)).json["id"]
        bob_key = (await _provider_key(client, bob, provider, "b", SECRET_B)).json["id"]
        shared_key = (await _provider_key(client, admin, provider, "s", SECRET_SHARED, owner_id=None)).json[
            "id"
        ]
        created = await client.call(
            "POST", "/api/keys", token=alice, json_body={"name": "k", "provider_id": provider}
        )
        assert created.json["provider_key_ids"] == [alice_key, shared_key]
        with client.state.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO gateway_key_pool (gateway_key_id, provider_key_id, position) VALUES (:g, :k, 9)"
                ),
                {"g": created.json["id"], "k": bob_key},
            )

        def view() -> Any:
            snapshot = load_snapshot(client.state.engine, client.state.box, UpstreamSettings())
            return snapshot.gateway_keys[hash_gateway_key(created.json["key"])]

        assert view().pool == (alice_key, shared_key)  # Bob's key never serves Alice's traffic
        assert view().enabled
        with client.state.engine.begin() as conn:
            conn.execute(sa.text("UPDATE users SET role = 'read_only' WHERE id = :id"), {"id": alice_id})
        assert not view().enabled  # read_only may not use openai
        del bob_id
