"""Helpers for the admin API tests: an app over a real database, a recording client, users of each role.

:func:`admin_app` builds the whole admin app (the same :func:`admin.app.create_app` the server runs) over a real
SQLite or PostgreSQL store and drives it through Quart's test client on trio. :class:`AdminClient` records every
response it sees, so a test can scan all of them for the secrets it created.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from quart_trio import QuartTrio

from admin.app import create_app
from admin.auth import TokenService, bootstrap_admin
from admin.state import AdminState, build_state
from trioproxy.app import open_store
from trioproxy.settings import Settings
from trioproxy.store.db import run_migrations

ADMIN_PASSWORD = "correct horse battery staple"
USER_PASSWORD = "another long password 42"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            return str(self.json["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class AdminClient:
    app: QuartTrio
    state: AdminState
    test_app: Any
    seen: list[Reply] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        remote_addr: str | None = None,
    ) -> Reply:
        client = self.test_app.test_client()
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": all_headers}
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        if remote_addr is not None:
            kwargs["scope_base"] = {"client": (remote_addr, 50000)}
        response = await client.open(path, method=method, **kwargs)
        reply = Reply(
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            await response.get_data(),
        )
        self.seen.append(reply)
        return reply

    async def login(self, username: str, password: str, **kwargs: Any) -> Reply:
        return await self.call(
            "POST", "/api/auth/login", json_body={"username": username, "password": password}, **kwargs
        )

    async def token(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
        reply = await self.login(username, password)
        assert reply.status == 200, reply.body
        return str(reply.json["access_token"])

    async def make_user(self, admin_token: str, username: str, role: str) -> tuple[int, str]:
        """Create a user of ``role`` through the API; its id and an access token."""
        reply = await self.call(
            "POST",
            "/api/users",
            token=admin_token,
            json_body={"username": username, "password": USER_PASSWORD, "role": role},
        )
        assert reply.status == 201, reply.body
        return int(reply.json["id"]), await self.token(username, USER_PASSWORD)

    def all_bodies(self, *, skip: Callable[[Reply], bool] = lambda _: False) -> str:
        return "\n".join(
            r.body.decode("utf-8", "replace") + json.dumps(r.headers) for r in self.seen if not skip(r)
        )


def admin_settings(tmp_path: Path, database_url: str = "", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "secret_key": "test-master-key",
        "admin_password": ADMIN_PASSWORD,
        "allow_private_upstreams": True,
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def admin_app(
    tmp_path: Path,
    database_url: str = "",
    *,
    tokens: TokenService | None = None,
    **settings_overrides: Any,
) -> AsyncIterator[AdminClient]:
    """The admin app over a fresh store (migrated), with the bootstrap admin created."""
    settings = admin_settings(tmp_path, database_url, **settings_overrides)
    if database_url:
        await trio.to_thread.run_sync(run_migrations, database_url)
    engine, box = await trio.to_thread.run_sync(open_store, settings)
    try:
        state = await trio.to_thread.run_sync(lambda: build_state(settings, engine, box))
        if tokens is not None:
            state.tokens = tokens
        app = create_app(state)
        async with app.test_app() as test_app:
            client = AdminClient(app, state, test_app)
            await bootstrap_admin(state, client.announced.append)
            yield client
    finally:
        await trio.to_thread.run_sync(engine.dispose)
