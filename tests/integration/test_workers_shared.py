"""`trioproxy serve --workers 2` acts as one gateway: one rate limit, one view of key health, and admin figures
for the whole group, on real processes and sockets; without Redis through the supervisor, and with PostgreSQL and
Redis (the several-hosts set-up) through Redis.

The requests go over one new connection each, so the kernel spreads them over both workers (all of them landing
on one worker has odds of 2**-99): a limit kept per worker would admit up to twice the limit, and a key state
kept per worker would let the second worker try the rejected key again.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpcore
import pytest
import trio

from tests.integration.harness import UPSTREAM_SECRET
from tests.integration.test_workers import _cli, _env, _read_line
from tests.redis_support import delete_prefix
from trioproxy.store.db import create_engine_for
from trioproxy.store.gateway_key_store import update_gateway_key
from trioproxy.testing.fake_upstream import FakeUpstream

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreading (Linux)")

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
REJECTED_SECRET = "sk-upstream-revoked"
RPM = 40
REQUESTS = 100
ADMIN_PASSWORD = "correct horse battery staple 42"  # test_workers._env sets it


async def _post(port: int, key: str) -> int:
    """One request on a new connection; the status."""
    async with httpcore.AsyncConnectionPool(max_connections=1) as pool:
        response = await pool.request(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers=[("authorization", f"Bearer {key}"), ("content-type", "application/json")],
            content=CHAT,
        )
        await response.aread()
        return response.status


async def _admin(port: int, method: str, path: str, token: str | None = None, body: object = None) -> object:
    headers = [("content-type", "application/json")]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request(
            method,
            f"http://127.0.0.1:{port}{path}",
            headers=headers,
            content=None if body is None else json.dumps(body).encode(),
        )
        data = await response.aread()
    assert response.status == 200, (path, response.status, data)
    if path == "/metrics":
        return data.decode()
    return json.loads(data)


def _mapped_files(pid: int) -> str:
    """The paths of the files (shared libraries of compiled extensions among them) mapped into process ``pid``."""
    return Path(f"/proc/{pid}/maps").read_text()


def _sample(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in exposition.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


@pytest.mark.parametrize(
    "shared_through",
    ["supervisor", pytest.param("redis", marks=[pytest.mark.postgres, pytest.mark.redis])],
)
async def test_two_workers_share_one_limit_one_key_health_and_one_set_of_figures(
    tmp_path: Path, shared_through: str, request: pytest.FixtureRequest
) -> None:
    env = _env(tmp_path)
    # Key states travel at once through the supervisor; through Redis, at its poll interval (1 s).
    propagation = 0.5
    if shared_through == "redis":
        # Several hosts' set-up: PostgreSQL (migrated first) and Redis, here for the two workers of one host.
        env["TRIOPROXY_DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["TRIOPROXY_REDIS_URL"] = request.getfixturevalue("redis_url")
        env["TRIOPROXY_REDIS_PREFIX"] = f"trioproxy-test:{secrets.token_hex(8)}"
        env["TRIOPROXY_REDIS_TIMEOUT"] = "5"
        await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "trioproxy", "migrate"],
                env=env,
                check=True,
                capture_output=True,
                timeout=60,
            )
        )
        propagation = 2.5
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,))
    async with trio.open_nursery() as nursery:
        fake_port = await nursery.start(fake.serve)
        base = f"http://127.0.0.1:{fake_port}"

        def provision() -> str:
            _cli(env, "provider", "add", "oa", "--kind", "openai", "--base-url", base)
            for name, secret in (("revoked", REJECTED_SECRET), ("good", UPSTREAM_SECRET)):
                _cli(
                    env,
                    "provider-key",
                    "add",
                    "--provider",
                    "oa",
                    "--name",
                    name,
                    "--secret",
                    "-",
                    stdin=secret,
                )
            created = _cli(
                env,
                "key",
                "create",
                "--name",
                "w",
                "--provider",
                "oa",
                "--strategy",
                "round_robin",
                "--retry-count",
                "1",
            )
            assert isinstance(created, dict)
            engine = create_engine_for(
                env.get("TRIOPROXY_DATABASE_URL") or f"sqlite:///{tmp_path / 'trioproxy.db'}"
            )
            try:
                update_gateway_key(engine, int(created["id"]), {"rpm_limit": RPM})
            finally:
                engine.dispose()
            return str(created["key"])

        key = await trio.to_thread.run_sync(provision)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioproxy", "serve", "--workers", "2"], env=env, stdout=subprocess.PIPE
        )
        pending = bytearray()
        try:
            admin_port = port = None
            pids: dict[int, int] = {}
            while port is None:
                line = await _read_line(process, pending)
                if line.startswith("trioproxy: admin listening on "):
                    admin_port = int(line.rsplit(":", 1)[1])
                elif line.startswith("trioproxy: proxy listening on "):
                    port = int(line.rsplit(":", 1)[1])
                elif line.startswith("trioproxy: worker "):  # trioproxy: worker I (pid P) listening on ...
                    words = line.split()
                    pids[int(words[2])] = int(words[4].rstrip(")"))
            assert admin_port is not None
            # Worker 1 reaches the database through the supervisor: no SQLAlchemy and no key decryption
            # (cryptography) in its memory; worker 0 has them for its admin plane (which proves the check sees
            # them when they are there).
            assert "sqlalchemy" not in _mapped_files(pids[1])
            assert "cryptography" not in _mapped_files(pids[1])
            assert "sqlalchemy" in _mapped_files(pids[0])

            # Until the provider has refused the revoked key once (round robin reaches it within two picks).
            statuses: list[int] = []
            while not any(r.header("authorization") == f"Bearer {REJECTED_SECRET}" for r in fake.captured):
                statuses.append(await _post(port, key))
                assert len(statuses) <= 2
            assert statuses == [200] * len(statuses)  # the refusal was retried on the good key
            await trio.sleep(propagation)  # the INVALID state reaches the other worker

            async def one() -> None:
                statuses.append(await _post(port, key))

            async with trio.open_nursery() as clients:
                for _ in range(REQUESTS):
                    clients.start_soon(one)

            # One limit for the group: exactly RPM admitted, the rest refused.
            assert statuses.count(200) == RPM, statuses
            assert statuses.count(429) == len(statuses) - RPM
            # One key health for the group: no worker tried the revoked key a second time.
            revoked = [r for r in fake.captured if r.header("authorization") == f"Bearer {REJECTED_SECRET}"]
            assert len(revoked) == 1

            # The admin plane (worker 0) reports the whole group.
            metrics = await _admin(admin_port, "GET", "/metrics")
            assert isinstance(metrics, str)
            assert _sample(metrics, "trioproxy_requests_total", status="200") == RPM
            assert _sample(metrics, "trioproxy_requests_total", status="429") == len(statuses) - RPM
            assert _sample(metrics, "trioproxy_upstream_errors_total", cause="401") == 1
            assert _sample(metrics, "trioproxy_provider_keys", state="invalid") == 1
            login = await _admin(
                admin_port, "POST", "/api/auth/login", body={"username": "admin", "password": ADMIN_PASSWORD}
            )
            assert isinstance(login, dict)
            token = str(login["access_token"])
            health = await _admin(admin_port, "GET", "/api/health/detailed", token)
            assert isinstance(health, dict)
            assert health["data_plane"]["workers"] == 2
            assert health["redis"]["limits_backend"] == shared_through
            status = await _admin(admin_port, "GET", "/api/loadbalancer/status", token)
            assert isinstance(status, dict)
            (pool,) = status["pools"]
            states = {k["name"]: k["state"] for k in pool["keys"]}
            assert states == {"revoked": "invalid", "good": "active"}
            assert sum(k["window_ok"] for k in pool["keys"]) == RPM
            limits = await _admin(admin_port, "GET", f"/api/keys/{pool['gateway_key_id']}/limits", token)
            assert isinstance(limits, dict)
            assert limits["backend"] == shared_through
            rpm = next(entry for entry in limits["limits"] if entry["name"] == "rpm")
            assert rpm["used"] == RPM

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert returncode == 0
        nursery.cancel_scope.cancel()
    if shared_through == "redis":
        await delete_prefix(env["TRIOPROXY_REDIS_URL"], env["TRIOPROXY_REDIS_PREFIX"])
