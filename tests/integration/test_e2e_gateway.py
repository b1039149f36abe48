"""The gateway's own behaviour end to end: privacy, authentication, failures, live configuration, draining."""

from __future__ import annotations

import gc
import json
import socket
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trio

from tests.integration.harness import UPSTREAM_SECRET, Stack, running_stack
from trioproxy.store.provisioning import set_gateway_key_enabled
from trioproxy.testing.fake_upstream import FakeUpstream, Fault
from trioproxy.upstream_conn import SLOW_WAIT

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

# Client headers that identify the client or steer the pooled key: none may reach the provider.
FORBIDDEN_CLIENT_HEADERS = {
    "x-forwarded-for": "203.0.113.7",
    "x-forwarded-host": "client.example",
    "x-forwarded-proto": "https",
    "x-forwarded-port": "443",
    "forwarded": "for=203.0.113.7;proto=https",
    "x-real-ip": "203.0.113.7",
    "true-client-ip": "203.0.113.7",
    "x-client-ip": "203.0.113.7",
    "x-cluster-client-ip": "203.0.113.7",
    "cf-connecting-ip": "203.0.113.7",
    "cf-ipcountry": "NZ",
    "fastly-client-ip": "203.0.113.7",
    "via": "1.1 corp-proxy",
    "cookie": "session=abc",
    "origin": "https://client.example",
    "referer": "https://client.example/page",
    "x-stainless-os": "Linux",
    "x-stainless-arch": "x64",
    "x-stainless-runtime": "CPython",
    "x-stainless-lang": "python",
    "x-stainless-package-version": "1.0.0",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=value",
    "baggage": "userId=alice",
    "x-request-id": "client-chosen-id",
    "openai-organization": "org-client",
    "openai-project": "proj-client",
    "sec-fetch-mode": "cors",
    "x-api-key": "should-not-pass",
    "x-goog-api-key": "should-not-pass",
    "proxy-authorization": "Basic Zm9vOmJhcg==",
    "x-amz-security-token": "token",
}


async def _request(
    stack: Stack,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> httpcore.Response:
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request(
            method,
            stack.base_url + target,
            headers=list((headers or {}).items()),
            content=body,
        )
        await response.aread()
        return response


def _openai_headers(stack: Stack) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.keys['openai']}", "content-type": "application/json"}


async def test_startup_objects_are_frozen_out_of_the_cyclic_collector(tmp_path: Path) -> None:
    """A full collection over everything loaded at startup paused the loop long enough to make 64 paced
    streams late (bench stream scenario); the gateway freezes them once it is up."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    async with running_stack(tmp_path):
        assert gc.get_freeze_count() > 0
    gc.unfreeze()


async def test_nothing_that_identifies_the_client_reaches_the_provider(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        headers = _openai_headers(stack) | FORBIDDEN_CLIENT_HEADERS | {"user-agent": "client-agent/9"}
        response = await _request(
            stack,
            "POST",
            f"/v1/chat/completions?key={stack.keys['openai']}",
            headers=headers,
            body=json.dumps(CHAT).encode(),
        )
        assert response.status == 200
        captured = stack.fake.captured[-1]
        [row] = await stack.rows(1)
    seen = dict(captured.headers)
    # x-request-id reaches the provider, but it is the gateway's own id, never the client's.
    leaked = sorted(
        name for name in FORBIDDEN_CLIENT_HEADERS if seen.get(name) == FORBIDDEN_CLIENT_HEADERS[name]
    )
    assert leaked == []
    assert seen["x-request-id"] == row["request_id"]
    assert len(FORBIDDEN_CLIENT_HEADERS) >= 20
    assert seen["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert seen["user-agent"].startswith("trioproxy/")
    assert seen["host"] == f"127.0.0.1:{stack.fake_port}"
    assert captured.query == ""
    flat = json.dumps(captured.headers) + captured.target
    assert "203.0.113.7" not in flat and "client.example" not in flat and stack.keys["openai"] not in flat
    # The response carries the gateway's request id, not the provider's, and none of its account headers.
    response_headers = {k.decode().lower(): v.decode() for k, v in response.headers}
    assert response_headers["x-request-id"] == row["request_id"]
    for name in ("set-cookie", "openai-organization", "x-ratelimit-limit-requests", "server", "cf-ray"):
        assert name not in response_headers
    assert row["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("target", "headers", "status", "shape"),
    [
        ("/v1/chat/completions", {}, 401, "openai"),
        ("/v1/chat/completions", {"authorization": "Bearer tpk_notarealkey"}, 401, "openai"),
        ("/v1/messages", {"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, 401, "anthropic"),
        ("/v1beta/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": "nope"}, 401, "gemini"),
        ("/v1/files", {}, 404, "openai"),
        ("/v1/../v1/files", {}, 400, "openai"),
    ],
)
async def test_refusals_answer_in_the_clients_dialect(
    tmp_path: Path, target: str, headers: dict[str, str], status: int, shape: str
) -> None:
    async with running_stack(tmp_path) as stack:
        response = await _request(
            stack, "POST", target, headers=headers | {"content-type": "application/json"}, body=b"{}"
        )
        [row] = await stack.rows(1)
        assert stack.fake.captured == []
    assert response.status == status
    body = json.loads(response.content)
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"]
    elif shape == "gemini":
        assert body["error"]["code"] == status and body["error"]["status"]
    else:
        assert body["error"]["message"] and body["error"]["type"]
    assert row["status"] == status
    assert row["outcome"] == "rejected"


async def test_a_key_used_on_another_providers_route_is_forbidden(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        response = await _request(
            stack,
            "POST",
            "/v1/messages",
            headers={"x-api-key": stack.keys["openai"], "anthropic-version": "2023-06-01"},
            body=b'{"model":"claude-haiku-4-5","max_tokens":5,"messages":[]}',
        )
        assert stack.fake.captured == []
    assert response.status == 403
    assert json.loads(response.content)["type"] == "error"


async def test_bad_json_is_a_dialect_400(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        response = await _request(
            stack, "POST", "/v1/chat/completions", headers=_openai_headers(stack), body=b"{not json"
        )
    assert response.status == 400
    assert json.loads(response.content)["error"]["type"] == "invalid_request_error"


async def test_disabling_a_key_is_live_within_a_second(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        ok = await _request(
            stack,
            "POST",
            "/v1/chat/completions",
            headers=_openai_headers(stack),
            body=json.dumps(CHAT).encode(),
        )
        assert ok.status == 200
        gateway_key_id = next(
            k.id for k in stack.gateway.snapshots.current.gateway_keys.values() if k.name == "openai-client"
        )
        await stack.provision(set_gateway_key_enabled, gateway_key_id, False)
        waited = await stack.wait_for_config(
            lambda: (
                not any(
                    k.enabled
                    for k in stack.gateway.snapshots.current.gateway_keys.values()
                    if k.id == gateway_key_id
                )
            ),
            timeout=1.0,
        )
        assert waited < 1.0
        refused = await _request(
            stack,
            "POST",
            "/v1/chat/completions",
            headers=_openai_headers(stack),
            body=json.dumps(CHAT).encode(),
        )
    assert refused.status == 401


async def test_upstream_error_status_is_passed_through_and_recorded(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,))
    fake.add_fault(Fault(status=429, headers=(("retry-after", "7"),)))
    async with running_stack(tmp_path, fake=fake) as stack:
        response = await _request(
            stack,
            "POST",
            "/v1/chat/completions",
            headers=_openai_headers(stack),
            body=json.dumps(CHAT).encode(),
        )
        [row] = await stack.rows(1)
    assert response.status == 429
    assert dict((k.lower(), v) for k, v in response.headers)[b"retry-after"] == b"7"
    assert json.loads(response.content)["error"]
    assert row["outcome"] == "upstream_error"
    assert row["status"] == 429
    assert row["cost_total"] is None


async def test_upstream_dying_mid_stream_ends_with_an_error_event_and_truncation(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), events=6)
    fake.add_fault(Fault(die_after_events=2))
    async with running_stack(tmp_path, fake=fake) as stack:
        body = json.dumps(CHAT | {"stream": True}).encode()
        with pytest.raises(httpcore.RemoteProtocolError):
            await _request(stack, "POST", "/v1/chat/completions", headers=_openai_headers(stack), body=body)
        [row] = await stack.rows(1)
    assert row["outcome"] == "upstream_died"
    assert row["usage_partial"] is True
    assert row["status"] == 200


async def test_upstream_dying_mid_stream_sends_one_dialect_error_event(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), events=6)
    fake.add_fault(Fault(die_after_events=2))
    async with running_stack(tmp_path, fake=fake) as stack:
        received = await _raw_stream(
            stack, b"/v1/chat/completions", json.dumps(CHAT | {"stream": True}).encode()
        )
    assert b'data: {"error"' in received
    assert b"[DONE]" not in received


async def _raw_stream(stack: Stack, target: bytes, body: bytes) -> bytes:
    """Send one request on a raw socket and return everything the gateway sent until it closed."""
    sock = await trio.open_tcp_stream("127.0.0.1", stack.gateway.proxy_port)
    head = (
        b"POST "
        + target
        + b" HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + stack.keys["openai"].encode() + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    await sock.send_all(head + body)
    received = b""
    with trio.fail_after(5):
        while chunk := await sock.receive_some(65536):
            received += chunk
    await sock.aclose()
    return received


async def _send_raw_chat(stack: Stack, chat: dict[str, Any]) -> trio.SocketStream:
    """A chat completion request written on a raw socket (so the test controls how the client leaves)."""
    sock = await trio.open_tcp_stream("127.0.0.1", stack.gateway.proxy_port)
    body = json.dumps(chat).encode()
    await sock.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + stack.keys["openai"].encode() + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return sock


async def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), events=200, chunk_delay=0.05)
    async with running_stack(tmp_path, fake=fake) as stack:
        sock = await _send_raw_chat(stack, CHAT | {"stream": True})
        with trio.fail_after(5):
            first = await sock.receive_some(65536)
        assert b"200" in first.split(b"\r\n", 1)[0]
        assert stack.fake.open_connections == 1
        # An abrupt close (RST) from the client.
        sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await sock.aclose()
        with trio.fail_after(2):
            while stack.fake.open_connections:
                await trio.sleep(0.01)
        [row] = await stack.rows(1)
    assert row["outcome"] == "client_cancelled"
    assert row["usage_partial"] is True


async def test_client_leaving_while_the_provider_thinks_cancels_the_upstream(tmp_path: Path) -> None:
    """No watcher runs for a fast answer; one starts once the provider keeps us waiting, so a client that
    hangs up before a slow non-streamed answer still frees the provider at once."""
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,))
    fake.add_fault(Fault(first_byte_delay=30.0))
    async with running_stack(tmp_path, fake=fake) as stack:
        sock = await _send_raw_chat(stack, CHAT)
        with trio.fail_after(5):
            while stack.fake.open_connections == 0:
                await trio.sleep(0.01)
        await trio.sleep(SLOW_WAIT + 0.2)  # the gateway now watches the client
        left_at = trio.current_time()
        await sock.aclose()
        with trio.fail_after(2):
            while stack.fake.open_connections:
                await trio.sleep(0.01)
        assert trio.current_time() - left_at < 1.0
        [row] = await stack.rows(1)
    assert row["outcome"] == "client_cancelled"
    assert row["status"] == 499


async def test_graceful_drain_finishes_in_flight_streams_and_records_them(tmp_path: Path) -> None:
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), events=10, chunk_delay=0.05)
    results: list[Any] = []
    async with running_stack(tmp_path, fake=fake) as stack:

        async def stream_one() -> None:
            body = json.dumps(CHAT | {"stream": True}).encode()
            results.append(await _raw_stream(stack, b"/v1/chat/completions", body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_one)
            with trio.fail_after(5):
                while not stack.fake.captured:
                    await trio.sleep(0.01)
            stack.gateway.request_stop()
        engine = stack.engine
    [received] = results
    assert received.endswith(b"0\r\n\r\n")
    assert b"data: [DONE]" in received
    from trioproxy.store.request_log import recent_requests

    rows = await trio.to_thread.run_sync(recent_requests, engine, 10)
    assert [r["outcome"] for r in rows] == ["ok"]


async def test_server_level_refusals_are_dialect_errors_and_rows(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        sock = await trio.open_tcp_stream("127.0.0.1", stack.gateway.proxy_port)
        await sock.send_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\nanthropic-version: 2023-06-01\r\n"
            b"content-length: 999999999999\r\n\r\n"
        )
        received = b""
        with trio.fail_after(5):
            while chunk := await sock.receive_some(65536):
                received += chunk
        await sock.aclose()
        [row] = await stack.rows(1)
        assert stack.fake.captured == []
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["type"] == "error"
    assert row["status"] == 413
    assert row["outcome"] == "rejected"
    assert row["path"] == "/v1/messages"


async def test_gemini_json_array_stream_is_relayed_and_metered(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        response = await _request(
            stack,
            "POST",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            headers={"x-goog-api-key": stack.keys["gemini"], "content-type": "application/json"},
            body=b'{"contents":[{"parts":[{"text":"hi"}]}]}',
        )
        [row] = await stack.rows(1)
        upstream_target = stack.fake.captured[-1].target
    assert response.status == 200
    elements = json.loads(response.content)  # the whole JSON array, as Google sends it
    assert isinstance(elements, list) and elements[-1]["usageMetadata"]["totalTokenCount"] > 0
    assert "alt=" not in upstream_target
    assert row["stream"] is True
    assert row["usage_partial"] is False
    assert row["output_tokens"] > 0
    assert row["cost_total"] is not None
