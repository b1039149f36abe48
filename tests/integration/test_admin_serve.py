"""The admin server on real sockets beside the data plane: hot reload end to end, key tests, limits, stopping."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpcore
import trio

from admin.serve import serve_admin
from admin.state import AdminState, build_state
from tests.integration.harness import UPSTREAM_SECRET, Stack, running_stack
from trioproxy.store.provisioning import list_provider_keys

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
RELOAD_DEADLINE = 1.0  # seconds within which a change made through the API must be live on :8080


@dataclass
class Admin:
    port: int
    state: AdminState
    announced: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def call(
        self, method: str, path: str, *, token: str | None = None, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        headers = [("content-type", "application/json")]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        content = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        async with httpcore.AsyncConnectionPool() as pool:
            response = await pool.request(method, self.base + path, headers=headers, content=content)
        answer = {k.decode().lower(): v.decode() for k, v in response.headers}
        return response.status, answer, json.loads(response.content) if response.content else None

    async def token(self, username: str, password: str) -> str:
        status, _, body = await self.call(
            "POST", "/api/auth/login", body={"username": username, "password": password}
        )
        assert status == 200, body
        return str(body["access_token"])


@asynccontextmanager
async def admin_beside(stack: Stack, **overrides: Any) -> AsyncIterator[Admin]:
    state = build_state(
        dataclasses.replace(stack.settings, **overrides), stack.engine, stack.box, gateway=stack.gateway
    )
    announced: list[str] = []
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            lambda task_status: serve_admin(
                state, "127.0.0.1", 0, announce=announced.append, task_status=task_status
            )
        )
        yield Admin(port, state, announced)
        nursery.cancel_scope.cancel()


def _bootstrap_password(admin: Admin) -> str:
    [message] = admin.announced
    return message.split("password ", 1)[1].split(" ", 1)[0]


async def _proxy_status(stack: Stack, key: str) -> int:
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request(
            "POST",
            stack.base_url + "/v1/chat/completions",
            headers=[("authorization", f"Bearer {key}"), ("content-type", "application/json")],
            content=CHAT,
        )
    return response.status


async def _until(stack: Stack, key: str, status: int) -> float:
    """Seconds until the proxy answers ``status`` for ``key`` (fails after RELOAD_DEADLINE)."""
    start = trio.current_time()
    with trio.fail_after(RELOAD_DEADLINE):
        while await _proxy_status(stack, key) != status:
            await trio.sleep(0.02)
    return trio.current_time() - start


async def test_changes_through_the_api_are_live_on_the_proxy_within_a_second(
    tmp_path: Path, db_url: str
) -> None:
    database_url = "" if db_url.startswith("sqlite") else db_url
    async with running_stack(tmp_path, database_url=database_url) as stack, admin_beside(stack) as admin:
        root = await admin.token("admin", _bootstrap_password(admin))
        status, _, user = await admin.call(
            "POST",
            "/api/users",
            token=root,
            body={"username": "alice", "password": "alice's long password", "role": "user"},
        )
        assert status == 201
        alice = await admin.token("alice", "alice's long password")
        status, _, provider = await admin.call(
            "POST",
            "/api/providers",
            token=root,
            body={"name": "fake", "kind": "openai", "base_url": f"http://127.0.0.1:{stack.fake_port}"},
        )
        assert status == 201
        status, _, pk = await admin.call(
            "POST",
            "/api/provider-keys",
            token=alice,
            body={"provider_id": provider["id"], "name": "mine", "secret": UPSTREAM_SECRET},
        )
        assert status == 201
        status, _, gk = await admin.call(
            "POST", "/api/keys", token=alice, body={"name": "app", "provider_id": provider["id"]}
        )
        assert status == 201
        key = gk["key"]
        assert await _until(stack, key, 200) < RELOAD_DEADLINE

        status, _, _ = await admin.call(
            "PATCH", f"/api/keys/{gk['id']}", token=alice, body={"enabled": False}
        )
        assert status == 200
        assert await _until(stack, key, 401) < RELOAD_DEADLINE
        await admin.call("PATCH", f"/api/keys/{gk['id']}", token=alice, body={"enabled": True})
        await _until(stack, key, 200)

        # Deactivating the user stops all of their keys; so does a role that may not use the provider's kind.
        status, _, _ = await admin.call(
            "PATCH", f"/api/users/{user['id']}", token=root, body={"enabled": False}
        )
        assert status == 200
        assert await _until(stack, key, 401) < RELOAD_DEADLINE
        await admin.call("PATCH", f"/api/users/{user['id']}", token=root, body={"enabled": True})
        await _until(stack, key, 200)
        await admin.call("PATCH", f"/api/users/{user['id']}", token=root, body={"role": "read_only"})
        assert await _until(stack, key, 401) < RELOAD_DEADLINE
        await admin.call("PATCH", f"/api/users/{user['id']}", token=root, body={"role": "user"})
        await _until(stack, key, 200)

        # Regenerating replaces the key at once; a disabled provider key empties the pool.
        alice = await admin.token("alice", "alice's long password")
        status, _, regenerated = await admin.call("POST", f"/api/keys/{gk['id']}/regenerate", token=root)
        assert status == 200
        assert await _until(stack, regenerated["key"], 200) < RELOAD_DEADLINE
        assert await _proxy_status(stack, key) == 401
        status, _, _ = await admin.call(
            "PATCH", f"/api/provider-keys/{pk['id']}", token=alice, body={"enabled": False}
        )
        assert status == 200
        start = trio.current_time()
        with trio.fail_after(RELOAD_DEADLINE):
            while await _proxy_status(stack, regenerated["key"]) == 200:
                await trio.sleep(0.02)
        assert trio.current_time() - start < RELOAD_DEADLINE


async def test_provider_key_test_probes_the_provider(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, admin_beside(stack) as admin:
        root = await admin.token("admin", _bootstrap_password(admin))
        _, _, provider = await admin.call(
            "POST",
            "/api/providers",
            token=root,
            body={"name": "fake", "kind": "gemini", "base_url": f"http://127.0.0.1:{stack.fake_port}"},
        )
        _, _, good = await admin.call(
            "POST",
            "/api/provider-keys",
            token=root,
            body={"provider_id": provider["id"], "name": "good", "secret": UPSTREAM_SECRET},
        )
        _, _, bad = await admin.call(
            "POST",
            "/api/provider-keys",
            token=root,
            body={
                "provider_id": provider["id"],
                "name": "bad",
                "secret": "AIza-wrong-key-0000000000000000000",
            },
        )
        before = len(stack.fake.captured)
        status, _, result = await admin.call("POST", f"/api/provider-keys/{good['id']}/test", token=root)
        assert status == 200
        assert result["ok"] is True
        assert result["status"] == 200
        assert result["model_count"] and result["model_count"] > 0
        assert result["latency_ms"] > 0
        probe = stack.fake.captured[before]
        assert probe.method == "GET"
        assert probe.path == "/v1beta/models"
        assert dict(probe.headers)["x-goog-api-key"] == UPSTREAM_SECRET
        status, _, result = await admin.call("POST", f"/api/provider-keys/{bad['id']}/test", token=root)
        assert (status, result["ok"], result["status"]) == (200, False, 401)
        assert "AIza" not in json.dumps(result)

    # With private upstreams no longer allowed, the stored loopback URL is refused before any byte is sent.
    async with (
        running_stack(tmp_path / "again") as stack,
        admin_beside(stack, allow_private_upstreams=False) as admin,
    ):
        root = await admin.token("admin", _bootstrap_password(admin))
        keys = await trio.to_thread.run_sync(list_provider_keys, stack.engine)
        before = len(stack.fake.captured)
        status, _, result = await admin.call("POST", f"/api/provider-keys/{keys[0]['id']}/test", token=root)
        assert status == 200
        assert result["ok"] is False
        assert "not allowed" in result["error"]
        assert len(stack.fake.captured) == before


async def test_body_limit_and_errors_on_the_wire(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, admin_beside(stack) as admin:
        root = await admin.token("admin", _bootstrap_password(admin))
        status, headers, body = await admin.call("POST", "/api/providers", token=root, raw=b"[" * 100_000)
        assert status == 400
        assert body["error"]["code"] == "bad_request"
        assert headers["content-type"] == "application/json"
        status, headers, body = await admin.call("GET", "/api/keys")
        assert status == 401
        assert "x-request-id" in headers
        assert "server" not in headers
        status, _, body = await admin.call("GET", "/api/openapi.json")
        assert status == 200
        assert "/api/keys/{key_id}/regenerate" in body["paths"]


async def test_serve_admin_stops_when_cancelled(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        state = build_state(stack.settings, stack.engine, stack.box)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                port: int = await nursery.start(
                    lambda task_status: serve_admin(
                        state, "127.0.0.1", 0, grace=2.0, announce=lambda _: None, task_status=task_status
                    )
                )
                stream = await trio.open_tcp_stream("127.0.0.1", port)  # an idle keep-alive connection
                start = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - start < 3.5
            await stream.aclose()
        try:
            await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            pass
        else:
            raise AssertionError("the admin port still accepts connections")


async def test_cancelling_the_server_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        state = build_state(stack.settings, stack.engine, stack.box)
        announced: list[str] = []
        result: dict[str, int] = {}
        borrowers = [object() for _ in range(int(state.db_limiter.total_tokens))]

        async def fetch(admin: Admin, token: str) -> None:
            result["status"] = (await admin.call("GET", "/api/auth/me", token=token))[0]

        async def release_later() -> None:
            await trio.sleep(0.3)
            for borrower in borrowers:
                state.db_limiter.release_on_behalf_of(borrower)

        with trio.fail_after(10):
            async with trio.open_nursery() as clients, trio.open_nursery() as server:
                port: int = await server.start(
                    lambda task_status: serve_admin(
                        state,
                        "127.0.0.1",
                        0,
                        grace=3.0,
                        announce=announced.append,
                        task_status=task_status,
                    )
                )
                admin = Admin(port, state, announced)
                token = await admin.token("admin", _bootstrap_password(admin))
                # Every database thread is taken: the next request waits inside the server.
                for borrower in borrowers:
                    state.db_limiter.acquire_on_behalf_of_nowait(borrower)
                clients.start_soon(fetch, admin, token)
                await trio.sleep(0.2)
                assert "status" not in result
                server.cancel_scope.cancel()
                clients.start_soon(release_later)
        assert result["status"] == 200


async def _read_response(stream: trio.SocketStream, conn: h11.Connection) -> h11.Response:
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response


async def test_keep_alive_survives_answers_given_before_the_body(tmp_path: Path) -> None:
    """An answer (405 here) to a request whose body has not arrived yet must leave the keep-alive connection
    usable: the server reads the body first (hypercorn would otherwise leave the connection hanging), and a 413,
    whose body is never read, tells the client to close the connection."""
    async with running_stack(tmp_path) as stack, admin_beside(stack) as admin:
        root = await admin.token("admin", _bootstrap_password(admin))
        stream = await trio.open_tcp_stream("127.0.0.1", admin.port)
        conn = h11.Connection(h11.CLIENT)
        body = b'{"username": "x"}'
        head = [("host", "admin"), ("content-type", "application/json"), ("content-length", str(len(body)))]
        await stream.send_all(conn.send(h11.Request(method="GET", target="/api/auth/login", headers=head)))
        with trio.move_on_after(0.2):
            await stream.receive_some(1)  # the server waits for the body before it answers
            raise AssertionError("answered before the request body arrived")
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        with trio.fail_after(3):
            assert (await _read_response(stream, conn)).status_code == 405
            conn.start_next_cycle()
            auth = [("host", "admin"), ("authorization", f"Bearer {root}")]
            await stream.send_all(conn.send(h11.Request(method="GET", target="/api/roles", headers=auth)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            assert (await _read_response(stream, conn)).status_code == 200
        await stream.aclose()

        stream = await trio.open_tcp_stream("127.0.0.1", admin.port)
        conn = h11.Connection(h11.CLIENT)
        big = [
            ("host", "admin"),
            ("authorization", f"Bearer {root}"),
            ("content-type", "application/json"),
            ("content-length", str(2 * 1024 * 1024)),
        ]
        await stream.send_all(conn.send(h11.Request(method="POST", target="/api/providers", headers=big)))
        # A declared length over the limit is refused before the body is read.
        await stream.send_all(conn.send(h11.Data(data=b"x" * 1000)))
        with trio.fail_after(3):
            response = await _read_response(stream, conn)
        assert response.status_code == 413
        assert (b"connection", b"close") in list(response.headers)
        await stream.aclose()
