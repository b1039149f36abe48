"""The same gateway on PostgreSQL, with a TLS upstream, and as the real `trioproxy serve` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpcore
import trio
import trustme

from tests.integration.harness import UPSTREAM_SECRET, running_stack
from trioproxy.testing.fake_upstream import FakeUpstream, FakeUsage

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def _post(url: str, key: str, body: dict[str, object]) -> httpcore.Response:
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request(
            "POST",
            url,
            headers=[("authorization", f"Bearer {key}"), ("content-type", "application/json")],
            content=json.dumps(body).encode(),
        )
        await response.aread()
        return response


async def test_postgres_mode_proxies_and_meters(tmp_path: Path, postgres_url: str) -> None:
    usage = FakeUsage(input_tokens=9, output_tokens=4)
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), usage=usage)
    async with running_stack(tmp_path, database_url=postgres_url, fake=fake) as stack:
        response = await _post(stack.base_url + "/v1/chat/completions", stack.keys["openai"], CHAT)
        assert response.status == 200
        assert b"data: [DONE]" in response.content
        [row] = await stack.rows(1)
    assert row["input_tokens"] == 9
    assert row["output_tokens"] == 4
    assert row["outcome"] == "ok"


async def test_tls_upstream_with_a_private_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    import ssl

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with running_stack(tmp_path, upstream_ssl=server_context, client_ssl=client_context) as stack:
        response = await _post(stack.base_url + "/v1/chat/completions", stack.keys["openai"], CHAT)
        assert response.status == 200
        [row] = await stack.rows(1)
        assert stack.fake.captured[-1].headers
    assert row["outcome"] == "ok"


async def test_serve_process_provisioned_by_the_cli_and_stopped_by_sigterm(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,))
    env = {
        **os.environ,
        "TRIOPROXY_DATA_DIR": str(tmp_path),
        "TRIOPROXY_PROXY_HOST": "127.0.0.1",
        "TRIOPROXY_PROXY_PORT": "0",
        "TRIOPROXY_ADMIN_PORT": "0",
        "TRIOPROXY_ADMIN_PASSWORD": "correct horse battery staple 42",
        "TRIOPROXY_ALLOW_PRIVATE_UPSTREAMS": "true",
    }
    env.pop("TRIOPROXY_DATABASE_URL", None)

    def cli(*args: str, stdin: str | None = None) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "trioproxy", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result: dict[str, object] = json.loads(done.stdout)
        return result

    async with trio.open_nursery() as nursery:
        fake_port = await nursery.start(fake.serve)
        await trio.to_thread.run_sync(
            lambda: cli(
                "provider", "add", "oa", "--kind", "openai", "--base-url", f"http://127.0.0.1:{fake_port}"
            )
        )
        await trio.to_thread.run_sync(
            lambda: cli(
                "provider-key",
                "add",
                "--provider",
                "oa",
                "--name",
                "k1",
                "--secret",
                "-",
                stdin=UPSTREAM_SECRET,
            )
        )
        created = await trio.to_thread.run_sync(
            lambda: cli("key", "create", "--name", "app", "--provider", "oa")
        )
        key = str(created["key"])
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioproxy", "serve"], env=env, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            output = b""
            with trio.fail_after(30):
                while b"proxy listening on" not in output or not output.endswith(b"\n"):
                    output += await process.stdout.receive_some(1)
            lines = output.decode().splitlines()
            port = int(next(line for line in lines if "proxy listening" in line).rsplit(":", 1)[1])
            admin_port = int(next(line for line in lines if "admin listening" in line).rsplit(":", 1)[1])
            async with httpcore.AsyncConnectionPool() as admin:
                health = await admin.request("GET", f"http://127.0.0.1:{admin_port}/api/openapi.json")
                assert health.status == 200
            response = await _post(f"http://127.0.0.1:{port}/v1/chat/completions", key, CHAT)
            assert response.status == 200
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert returncode == 0
        usage = await trio.to_thread.run_sync(lambda: cli("usage", "--last", "5"))
        nursery.cancel_scope.cancel()
    rows = usage["requests"] if isinstance(usage, dict) and "requests" in usage else usage
    assert isinstance(rows, list) and rows
    assert rows[0]["outcome"] == "ok"
    assert rows[0]["output_tokens"] > 0
