"""The permission matrix, generated from the app's route table: every role against every route, on its own
objects, on another user's objects and on missing ones, plus anonymous callers.

The expected answer of each cell is derived from the role's permissions (``trioproxy.roles.ROLES``) and the
route's declared requirement (``admin.rbac.route_table``), never written out per cell:

* no token: 401 on every route that is not public;
* a role without the route's permission: 403;
* with it: success on its own objects and on collections; on another user's object, a read succeeds with
  ``view_all_tenants`` and is 404 without it (no existence oracle); a change succeeds with
  ``manage_all_tenants``, is 403 with only ``view_all_tenants``, 404 otherwise (``manage_health`` commands
  need only ``view_all_tenants``); a missing object is 404.

:data:`SPECS` says, per route, what object it acts on and what a valid call looks like; a route added to the app
without a spec fails this test until it gets one. A second test checks that a ``read_only`` account changes
nothing at all: no configuration version bump, no audit row beyond its own session.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import trio

from admin.rbac import Access, RouteInfo, route_table
from tests.integration.admin_support import ADMIN_PASSWORD, USER_PASSWORD, AdminClient, Reply
from tests.integration.harness import UPSTREAM_SECRET, running_stack
from tests.integration.test_admin_observability import admin_over, assert_no_secrets
from trioproxy.records import Outcome, RequestRecord
from trioproxy.roles import ROLES, Permission, may_use_kind
from trioproxy.store.gateway_key_store import create_gateway_key
from trioproxy.store.price_admin import create_price
from trioproxy.store.provisioning import add_provider, add_provider_key
from trioproxy.store.request_log import insert_request_records
from trioproxy.store.users import create_user

MISSING = 999_999
# Routes whose answer is a credential by design: tokens, or a new gateway key shown once.
CREDENTIAL_ROUTES = {
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/refresh"),
    ("POST", "/api/auth/password"),
    ("POST", "/api/keys"),
    ("POST", "/api/keys/<id:key_id>/regenerate"),
}
_unique = itertools.count(1)
_ips = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_unique)}"


@dataclass
class Account:
    role: str
    user_id: int
    username: str
    password: str
    access: str = ""
    refresh: str = ""
    own: dict[str, int] = field(default_factory=dict)  # target kind -> id of an object this account owns
    gateway_key: str | None = None  # the secret of its own gateway key, for /api/stats/self


@dataclass
class World:
    client: AdminClient
    accounts: dict[str, Account]  # role -> account; "victim" is another user (role "user") owning objects
    provider_id: int  # the fake OpenAI provider: owned keys and gateway keys hang off it
    other_provider: int  # a provider only the matrix changes
    price_id: int
    replies: list[tuple[str, str, Reply]] = field(default_factory=list)  # (method, rule, reply) of every call

    async def thread(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        engine = self.client.state.engine
        return await trio.to_thread.run_sync(partial(fn, engine, *args, **kwargs))

    # Objects made for one call that consumes them (DELETE, regenerate).
    async def fresh(self, target: str, owner: int | None) -> int:
        box = self.client.state.box
        if target == "provider":
            made = await self.thread(
                add_provider,
                name=unique("p"),
                kind="openai",
                base_url="https://api.example.com",
                allow_private=True,
            )
        elif target == "price":
            made = await self.thread(
                create_price,
                provider_kind="openai",
                model=unique("m"),
                input_per_million=Decimal(1),
                output_per_million=Decimal(2),
            )
        elif target == "user":
            made = await self.thread(create_user, username=unique("u"), role="user")
        elif target == "provider_key":
            made = await trio.to_thread.run_sync(
                partial(
                    add_provider_key,
                    self.client.state.engine,
                    box,
                    provider=self.provider_id,
                    name=unique("pk"),
                    secret=UPSTREAM_SECRET,
                    owner_id=owner,
                )
            )
        elif target == "gateway_key":
            made = await self.thread(
                create_gateway_key, name=unique("gk"), provider=self.provider_id, owner_id=owner
            )
        else:
            raise AssertionError(target)
        return int(made["id"])


Body = Callable[[World, Account], Any]


@dataclass(frozen=True)
class Spec:
    """How to call one route and what it acts on.

    ``target``: None (a collection, or the caller's own session), "global" objects everyone with the permission
    may act on ("provider", "price"), the caller's or another user's account ("user"), or owned objects
    ("provider_key", "gateway_key", "request"). ``change``: the route changes its object (tenancy by
    ``manage_all_tenants``) rather than reading it. ``fresh``: the call consumes its object, so every call
    gets a new one. ``own_status``: a different, documented answer on one's own object (deleting oneself).
    """

    target: str | None = None
    change: bool = False
    body: Body | None = None
    ok: int = 200
    fresh: bool = False
    query: str = ""
    own_status: int | None = None
    health_command: bool = False  # manage_health: changes any key the caller can see
    relogin: bool = False  # the call revokes the caller's tokens


def _login_body(world: World, who: Account) -> Any:
    return {"username": who.username, "password": who.password}


SPECS: dict[tuple[str, str], Spec] = {
    ("POST", "/api/auth/login"): Spec(body=_login_body),
    ("POST", "/api/auth/refresh"): Spec(body=lambda w, a: {"refresh_token": a.refresh}),
    ("POST", "/api/auth/logout"): Spec(ok=204, relogin=True),
    ("GET", "/api/auth/me"): Spec(),
    ("POST", "/api/auth/password"): Spec(
        body=lambda w, a: {"current_password": a.password, "new_password": a.password}, relogin=True
    ),
    ("GET", "/api/roles"): Spec(),
    ("GET", "/api/users"): Spec(),
    ("POST", "/api/users"): Spec(
        body=lambda w, a: {"username": unique("new"), "password": USER_PASSWORD}, ok=201
    ),
    ("GET", "/api/users/<id:user_id>"): Spec(target="user"),
    ("PATCH", "/api/users/<id:user_id>"): Spec(
        target="user", change=True, body=lambda w, a: {"email": f"{unique('e')}@example.com"}
    ),
    ("DELETE", "/api/users/<id:user_id>"): Spec(
        target="user", change=True, ok=204, fresh=True, own_status=409
    ),
    ("POST", "/api/users/<id:user_id>/unlock"): Spec(target="user", change=True, ok=204),
    ("GET", "/api/providers"): Spec(),
    ("POST", "/api/providers"): Spec(
        body=lambda w, a: {"name": unique("prov"), "kind": "openai", "base_url": "https://api.example.com"},
        ok=201,
    ),
    ("GET", "/api/providers/<id:provider_id>"): Spec(target="provider"),
    ("PATCH", "/api/providers/<id:provider_id>"): Spec(
        target="provider", change=True, body=lambda w, a: {"enabled": True}
    ),
    ("DELETE", "/api/providers/<id:provider_id>"): Spec(target="provider", change=True, ok=204, fresh=True),
    ("GET", "/api/provider-keys"): Spec(),
    ("POST", "/api/provider-keys"): Spec(
        body=lambda w, a: {"provider_id": w.provider_id, "name": unique("k"), "secret": UPSTREAM_SECRET},
        ok=201,
    ),
    ("GET", "/api/provider-keys/<id:key_id>"): Spec(target="provider_key"),
    ("PATCH", "/api/provider-keys/<id:key_id>"): Spec(
        target="provider_key", change=True, body=lambda w, a: {"weight": 1}
    ),
    ("DELETE", "/api/provider-keys/<id:key_id>"): Spec(
        target="provider_key", change=True, ok=204, fresh=True
    ),
    ("POST", "/api/provider-keys/<id:key_id>/test"): Spec(target="provider_key", change=True),
    ("GET", "/api/keys"): Spec(),
    ("POST", "/api/keys"): Spec(
        body=lambda w, a: {"name": unique("gk"), "provider_id": w.provider_id}, ok=201
    ),
    ("GET", "/api/keys/<id:key_id>"): Spec(target="gateway_key"),
    ("PATCH", "/api/keys/<id:key_id>"): Spec(
        target="gateway_key", change=True, body=lambda w, a: {"retry_count": 1}
    ),
    ("POST", "/api/keys/<id:key_id>/regenerate"): Spec(target="gateway_key", change=True, fresh=True),
    ("DELETE", "/api/keys/<id:key_id>"): Spec(target="gateway_key", change=True, ok=204, fresh=True),
    ("GET", "/api/keys/<id:key_id>/limits"): Spec(target="gateway_key"),
    ("GET", "/api/prices"): Spec(),
    ("POST", "/api/prices"): Spec(
        body=lambda w, a: {
            "provider_kind": "openai",
            "model": unique("model"),
            "input_per_million": "1",
            "output_per_million": "2",
        },
        ok=201,
    ),
    ("GET", "/api/prices/<id:price_id>"): Spec(target="price"),
    ("PATCH", "/api/prices/<id:price_id>"): Spec(
        target="price", change=True, body=lambda w, a: {"input_per_million": "1.5"}
    ),
    ("DELETE", "/api/prices/<id:price_id>"): Spec(target="price", change=True, ok=204, fresh=True),
    ("GET", "/api/requests"): Spec(query="?page_size=5"),
    ("GET", "/api/requests/<request_id>"): Spec(target="request"),
    ("GET", "/api/statistics/overview"): Spec(query="?tz=Europe/Berlin"),
    ("GET", "/api/statistics/timeseries"): Spec(query="?bucket=day&tz=Asia/Tokyo"),
    ("GET", "/api/statistics/models"): Spec(),
    ("GET", "/api/statistics/keys"): Spec(),
    ("GET", "/api/statistics/providers"): Spec(),
    ("GET", "/api/stats/self"): Spec(),  # a gateway key's own credential: see _stats_self
    ("GET", "/api/audit"): Spec(),
    ("GET", "/api/health"): Spec(),
    ("GET", "/api/health/detailed"): Spec(),
    ("GET", "/api/system/info"): Spec(),
    ("GET", "/api/adapters"): Spec(),
    ("GET", "/api/loadbalancer/status"): Spec(),
    ("POST", "/api/loadbalancer/keys/<id:key_id>/reset"): Spec(
        target="provider_key", change=True, health_command=True
    ),
    ("POST", "/api/loadbalancer/keys/<id:key_id>/disable"): Spec(
        target="provider_key", change=True, health_command=True
    ),
    ("POST", "/api/loadbalancer/keys/<id:key_id>/enable"): Spec(
        target="provider_key", change=True, health_command=True
    ),
    ("GET", "/metrics"): Spec(),
}


def expected(route: RouteInfo, spec: Spec, role: str, whose: str) -> int:
    """The answer the role's permissions call for (see the module doc)."""
    permissions = ROLES[role]
    if isinstance(route.requirement, Permission) and route.requirement not in permissions:
        return 403
    if whose == "missing":
        return 404
    if spec.target in (None, "provider", "price"):
        return spec.ok
    if spec.target == "user":
        # Accounts belong to nobody: view_users reads any, manage_users changes any it may grant (all are "user").
        return spec.own_status if whose == "own" and spec.own_status is not None else spec.ok
    if whose == "own":
        return spec.ok
    view_all = Permission.VIEW_ALL_TENANTS in permissions
    if not spec.change:
        return spec.ok if view_all else 404
    if Permission.MANAGE_ALL_TENANTS in permissions or (spec.health_command and view_all):
        return spec.ok
    return 403 if view_all else 404


def _fill(rule: str, value: int | str) -> str:
    for name in ("user_id", "provider_id", "key_id", "price_id"):
        rule = rule.replace(f"<id:{name}>", str(value))
    return rule.replace("<request_id>", str(value))


async def _login(client: AdminClient, account: Account) -> None:
    reply = await client.login(account.username, account.password, remote_addr=f"10.9.{next(_ips) % 250}.1")
    assert reply.status == 200, reply.body
    account.access, account.refresh = reply.json["access_token"], reply.json["refresh_token"]


async def _world(client: AdminClient, provider_id: int) -> World:
    root = Account("super_admin", 1, "admin", ADMIN_PASSWORD)
    await _login(client, root)
    accounts = {"super_admin": root}
    for role in [*(r for r in ROLES if r != "super_admin"), "victim"]:
        reply = await client.call(
            "POST",
            "/api/users",
            token=root.access,
            json_body={
                "username": f"m-{role}",
                "password": USER_PASSWORD,
                "role": "user" if role == "victim" else role,
            },
        )
        assert reply.status == 201, reply.body
        account = Account(
            "user" if role == "victim" else role, int(reply.json["id"]), f"m-{role}", USER_PASSWORD
        )
        await _login(client, account)
        accounts[role] = account
    world = World(client, accounts, provider_id, 0, 0)
    world.other_provider = await world.fresh("provider", None)
    world.price_id = await world.fresh("price", None)
    rows = []
    for name, account in accounts.items():
        account.own["user"] = account.user_id
        account.own["request"] = account.user_id  # rows are inserted below, with request id "req-<user id>"
        rows.append(
            RequestRecord(
                request_id=f"req-{account.user_id}",
                started_at=1_700_000_000.0,
                route="openai.chat_completions",
                method="POST",
                path="/v1/chat/completions",
                client_ip=None,
                user_id=account.user_id,
                status=200,
                outcome=Outcome.OK,
            )
        )
        if may_use_kind(account.role, "openai"):
            account.own["provider_key"] = await world.fresh("provider_key", account.user_id)
            made = await world.thread(
                create_gateway_key, name=f"own-{name}", provider=provider_id, owner_id=account.user_id
            )
            account.own["gateway_key"], account.gateway_key = int(made["id"]), str(made["key"])
    await world.thread(insert_request_records, rows)
    return world


def _object_id(world: World, spec: Spec, caller: Account, whose: str) -> int | str | None:
    """The id the cell acts on, or None when the caller has no such object of its own."""
    if whose == "missing":
        return "req-missing" if spec.target == "request" else MISSING
    if spec.target == "provider":
        return world.other_provider
    if spec.target == "price":
        return world.price_id
    owner = caller if whose == "own" else world.accounts["victim"]
    object_id = owner.own.get(spec.target or "")
    if object_id is None:
        return None
    return f"req-{object_id}" if spec.target == "request" else object_id


async def _call(
    world: World, route: RouteInfo, spec: Spec, caller: Account | None, whose: str
) -> Reply | None:
    client = world.client
    rule = route.rule
    if spec.target is not None:
        object_id = _object_id(world, spec, caller or world.accounts["victim"], whose)
        if object_id is None:
            return None
        if spec.fresh and whose != "missing" and not (spec.own_status and whose == "own"):
            owner = (
                None
                if spec.target in ("provider", "price", "user")
                else (
                    (caller or world.accounts["victim"]).user_id
                    if whose == "own"
                    else world.accounts["victim"].user_id
                )
            )
            object_id = await world.fresh(spec.target, owner)
        rule = _fill(rule, object_id)
    body = spec.body(world, caller or world.accounts["victim"]) if spec.body is not None else None
    kwargs: dict[str, Any] = {"json_body": body}
    if route.rule == "/api/auth/login":
        kwargs["remote_addr"] = f"10.8.{next(_ips) % 250}.1"
    reply = await client.call(
        route.method, rule + spec.query, token=caller.access if caller else None, **kwargs
    )
    world.replies.append((route.method, route.rule, reply))
    if caller is not None and spec.relogin and reply.status < 300:
        await _login(client, caller)
    return reply


async def _stats_self(world: World) -> int:
    """The one route a gateway key opens: each role's own key reads its own usage; JWTs and nothing do not."""
    cells = 0
    for account in world.accounts.values():
        for credential, status in ((account.gateway_key, 200), (account.access, 401)):
            if credential is None:
                continue
            reply = await world.client.call(
                "GET", "/api/stats/self", headers={"Authorization": f"Bearer {credential}"}
            )
            assert reply.status == status, (account.role, reply.body)
            cells += 1
    assert (await world.client.call("GET", "/api/stats/self")).status == 401
    return cells


def _variants(spec: Spec) -> tuple[str, ...]:
    if spec.target is None:
        return ("other",)
    if spec.target in ("provider", "price"):  # global objects: nobody's own
        return ("other", "missing")
    return ("own", "other", "missing")


async def _run_matrix(world: World, table: list[RouteInfo]) -> list[tuple[str, RouteInfo, str, int, int]]:
    cells: list[tuple[str, RouteInfo, str, int, int]] = []
    for route in table:
        spec = SPECS[(route.method, route.rule)]
        if route.rule == "/api/stats/self":
            continue
        anonymous = await _call(world, route, spec, None, "missing" if spec.target else "other")
        assert anonymous is not None
        if route.requirement is Access.PUBLIC:
            assert anonymous.status < 500, (route, anonymous.body)
        else:
            assert anonymous.status == 401, (route, anonymous.status)
            assert anonymous.error_code == "unauthorized"
    for role, account in world.accounts.items():
        if role == "victim":
            continue
        for route in table:
            spec = SPECS[(route.method, route.rule)]
            if route.rule == "/api/stats/self":
                continue
            for whose in _variants(spec):
                reply = await _call(world, route, spec, account, whose)
                if reply is None:
                    continue
                want = (
                    spec.ok
                    if route.requirement is Access.PUBLIC
                    else expected(route, spec, account.role, whose)
                )
                cells.append((role, route, whose, want, reply.status))
                assert reply.status < 500, (role, route.method, route.rule, whose, reply.body)
                if reply.status >= 400:
                    assert reply.error_code is not None, reply.body
    return cells


async def test_permission_matrix_every_role_every_route_own_and_others(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, admin_over(stack) as client:
        table = route_table(client.app)
        assert {(r.method, r.rule) for r in table} == set(SPECS), "every route needs a spec (and only routes)"
        provider_id = next(
            p.id for p in stack.gateway.snapshots.current.providers.values() if p.name == "openai-fake"
        )
        world = await _world(client, provider_id)
        await stack.wait_for_config(
            lambda: all(
                any(
                    g.id == a.own["gateway_key"]
                    for g in stack.gateway.snapshots.current.gateway_keys.values()
                )
                for a in world.accounts.values()
                if "gateway_key" in a.own
            )
        )
        cells = await _run_matrix(world, table)
        wrong = [
            f"{role:11} {route.method:6} {route.rule:45} {whose:7} want {want} got {got}"
            for role, route, whose, want, got in cells
            if want != got
        ]
        assert not wrong, "\n" + "\n".join(wrong)
        assert len(cells) >= 6 * len(table)
        # Every outcome the model has occurs somewhere: the matrix really exercises tenancy.
        assert {got for *_, got in cells} >= {200, 201, 204, 403, 404, 409}
        assert any(whose == "other" and got == 404 for _, _, whose, _, got in cells)
        assert any(
            whose == "other" and got == 403
            for _, route, whose, _, got in cells
            if route.rule.startswith("/api/keys")
        )
        assert await _stats_self(world) >= 8
        # No answer carries a secret, but those that hand out a credential by design (tokens, a new key).
        scanned = [reply for method, rule, reply in world.replies if (method, rule) not in CREDENTIAL_ROUTES]
        secrets = [UPSTREAM_SECRET, USER_PASSWORD, ADMIN_PASSWORD, "test-master-key"]
        secrets += [a.gateway_key for a in world.accounts.values() if a.gateway_key]
        assert assert_no_secrets(scanned, secrets) > 100_000


async def test_read_only_changes_nothing(tmp_path: Path) -> None:
    """A read_only account, calling every route of the app with valid bodies on its own and others' objects,
    leaves the configuration version and the audit log as they were (but for its own logins)."""
    async with running_stack(tmp_path) as stack, admin_over(stack) as client:
        provider_id = next(
            p.id for p in stack.gateway.snapshots.current.providers.values() if p.name == "openai-fake"
        )
        world = await _world(client, provider_id)
        reader = world.accounts["read_only"]
        engine = client.state.engine

        def version_and_audit() -> tuple[int, int]:
            with engine.connect() as conn:
                version = conn.execute(
                    sa.text("SELECT version FROM config_version WHERE id = 1")
                ).scalar_one()
                rows = conn.execute(
                    sa.text("SELECT count(*) FROM audit_log WHERE actor_id IS NULL OR actor_id != :me"),
                    {"me": reader.user_id},
                ).scalar_one()
            return int(version), int(rows)

        before = await trio.to_thread.run_sync(version_and_audit)
        changed = []
        for route in route_table(client.app):
            spec = SPECS[(route.method, route.rule)]
            if route.method == "GET" or route.rule.startswith("/api/auth/"):
                continue  # reads, and one's own session (login, logout, password) are not configuration
            for whose in ("own", "other"):
                reply = await _call_without_fresh(world, route, spec, reader, whose)
                if reply is not None and reply.status < 400:
                    changed.append((route.method, route.rule, whose, reply.status))
        assert changed == []
        assert await trio.to_thread.run_sync(version_and_audit) == before
        with engine.connect() as conn:
            actions = {
                row[0]
                for row in conn.execute(
                    sa.text("SELECT action FROM audit_log WHERE actor_id = :me"), {"me": reader.user_id}
                )
            }
        assert actions <= {"login"}


async def _call_without_fresh(
    world: World, route: RouteInfo, spec: Spec, caller: Account, whose: str
) -> Reply | None:
    """Like _call, on the existing objects (a read_only caller must not even reach a fresh one's deletion)."""
    plain = Spec(**{**spec.__dict__, "fresh": False})
    return await _call(world, route, plain, caller, whose)
