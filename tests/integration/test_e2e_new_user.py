"""The control plane's "done when", as a new user would try it: log in as the bootstrap admin, create a user, a
provider, two provider keys and a gateway key through the API alone, call :8080 with the official SDK, and find
the request, its tokens and its cost in /api/requests and /api/statistics; the user sees only its own data."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpcore
import openai
import trio

from admin.serve import run_control_plane
from tests.integration.harness import running_stack
from trioproxy.testing.fake_upstream import FakeUpstream, FakeUsage

ADMIN_PASSWORD = "bootstrap-admin-password-42"
SECRETS = ("sk-first-key", "sk-second-key")


class Admin:
    """A tiny client of the admin API over real sockets."""

    def __init__(self, pool: httpcore.AsyncConnectionPool, port: int) -> None:
        self._pool = pool
        self._base = f"http://127.0.0.1:{port}"
        self.token = ""

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> Any:
        headers = [("authorization", f"Bearer {token if token is not None else self.token}")]
        content = b""
        if body is not None:
            headers.append(("content-type", "application/json"))
            content = json.dumps(body).encode()
        response = await self._pool.request(method, self._base + path, headers=headers, content=content)
        await response.aread()
        assert response.status < 300, (method, path, response.status, response.content[:300])
        return json.loads(response.content)

    async def login(self, username: str, password: str) -> str:
        response = await self._pool.request(
            "POST",
            self._base + "/api/auth/login",
            headers=[("content-type", "application/json")],
            content=json.dumps({"username": username, "password": password}).encode(),
        )
        await response.aread()
        assert response.status == 200, response.content
        token: str = json.loads(response.content)["access_token"]
        return token


async def test_a_new_user_sets_everything_up_through_the_api_and_sees_the_cost(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=SECRETS, usage=FakeUsage(input_tokens=100, output_tokens=50))
    async with (
        running_stack(
            tmp_path, fake=fake, control_plane=run_control_plane, admin_port=0, admin_password=ADMIN_PASSWORD
        ) as stack,
        httpcore.AsyncConnectionPool() as pool,
    ):
        assert stack.gateway.admin_port is not None
        admin = Admin(pool, stack.gateway.admin_port)
        admin.token = await admin.login("admin", ADMIN_PASSWORD)
        user = await admin.call(
            "POST", "/api/users", {"username": "dana", "password": "dana-password-123", "role": "user"}
        )
        provider = await admin.call(
            "POST",
            "/api/providers",
            {"name": "openai-api", "kind": "openai", "base_url": f"http://127.0.0.1:{stack.fake_port}"},
        )
        for index, secret in enumerate(SECRETS):
            created = await admin.call(
                "POST",
                "/api/provider-keys",
                {
                    "provider_id": provider["id"],
                    "name": f"k{index}",
                    "secret": secret,
                    "owner_id": user["id"],
                },
            )
            assert secret not in json.dumps(created)
        gateway_key = await admin.call(
            "POST",
            "/api/keys",
            {"name": "dana-app", "provider_id": provider["id"], "owner_id": user["id"], "retry_count": 1},
        )
        key = gateway_key["key"]
        # Live on :8080 within a second, without a restart.
        await stack.wait_for_config(
            lambda: len(stack.gateway.snapshots.current.gateway_keys) > 3, timeout=1.0
        )

        client = openai.OpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)
        completion = await trio.to_thread.run_sync(
            lambda: client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
            )
        )
        assert completion.choices[0].message.content
        await stack.rows(1)

        dana = await admin.login("dana", "dana-password-123")
        mine = await admin.call("GET", "/api/requests", token=dana)
        everything = await admin.call("GET", "/api/requests")
        overview = await admin.call("GET", "/api/statistics/overview?tz=UTC", token=dana)
    [row] = mine["items"]
    assert row["gateway_key_id"] == gateway_key["id"]
    assert (row["input_tokens"], row["output_tokens"]) == (100, 50)
    # gpt-4o-mini: $0.15 input and $0.60 output per million tokens.
    expected = (Decimal(100) * Decimal("0.15") + Decimal(50) * Decimal("0.60")) / Decimal(1_000_000)
    assert Decimal(row["cost_total"]) == expected
    assert everything["total"] >= mine["total"] == 1
    today = overview["today"]
    assert today["requests"] == 1
    assert Decimal(today["cost"]) == expected
