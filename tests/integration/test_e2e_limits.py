"""Limits, budgets and stream accounting end to end, through the gateway to the fake upstream."""

from __future__ import annotations

import json
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import trio

from tests.integration.harness import UPSTREAM_SECRET, Stack, running_stack
from trioproxy.store.gateway_key_store import update_gateway_key
from trioproxy.testing.fake_upstream import FakeUpstream, FakeUsage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _set_limits(stack: Stack, kind: str, **limits: Any) -> None:
    gateway_key = next(
        k for k in stack.gateway.snapshots.current.gateway_keys.values() if k.name == f"{kind}-client"
    )
    await trio.to_thread.run_sync(partial(update_gateway_key, stack.engine, gateway_key.id, limits))
    await stack.wait_for_config(
        lambda: all(
            getattr(k, name) is not None
            for k in stack.gateway.snapshots.current.gateway_keys.values()
            if k.id == gateway_key.id
            for name in limits
        )
    )


async def _post(pool: httpcore.AsyncConnectionPool, stack: Stack, body: dict[str, Any]) -> httpcore.Response:
    response = await pool.request(
        "POST",
        stack.base_url + "/v1/chat/completions",
        headers=[("authorization", f"Bearer {stack.keys['openai']}"), ("content-type", "application/json")],
        content=json.dumps(body).encode(),
    )
    await response.aread()
    return response


async def test_rpm_50_admits_exactly_50_of_200_concurrent_requests(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        await _set_limits(stack, "openai", rpm_limit=50)
        responses: list[httpcore.Response] = []
        async with httpcore.AsyncConnectionPool(max_connections=200) as pool, trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(lambda: _append(responses, _post(pool, stack, CHAT)))
        rows = await stack.rows(200)
        upstream_calls = len(stack.fake.captured)
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    assert upstream_calls == 50
    refused = next(r for r in responses if r.status == 429)
    headers = {k.lower(): v for k, v in refused.headers}
    assert int(headers[b"retry-after"]) > 0
    assert headers[b"x-ratelimit-limit-requests"] == b"50"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    body = json.loads(refused.content)
    assert body["error"]["type"] == "rate_limit_error" or body["error"]["code"] == "rate_limit_exceeded"
    assert sum(1 for r in rows if r["outcome"] == "rejected" and r["status"] == 429) == 150


async def _append(out: list[httpcore.Response], request: Any) -> None:
    out.append(await request)


async def test_a_one_dollar_budget_holds_under_100_way_concurrency(tmp_path: Path) -> None:
    # gpt-4o-mini: $0.15 in, $0.60 out per million; 8,000 output tokens cost $0.0048 per request.
    fake = FakeUpstream(
        accepted_keys=(UPSTREAM_SECRET,), usage=FakeUsage(input_tokens=1000, output_tokens=8000)
    )
    async with running_stack(tmp_path, fake=fake) as stack:
        await _set_limits(stack, "openai", budget=Decimal("1.00"))
        body = CHAT | {"max_tokens": 10_000}
        responses: list[httpcore.Response] = []
        async with httpcore.AsyncConnectionPool(max_connections=100) as pool:
            for _ in range(4):
                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        nursery.start_soon(lambda: _append(responses, _post(pool, stack, body)))
        rows = await stack.rows(400)
    spend = sum((Decimal(r["cost_total"]) for r in rows if r["cost_total"] is not None), Decimal(0))
    admitted = sum(1 for r in responses if r.status == 200)
    assert spend <= Decimal("1.01")
    assert spend >= Decimal("0.95")
    assert admitted == sum(1 for r in rows if r["outcome"] == "ok")
    refused = [r for r in responses if r.status == 429]
    assert refused
    assert json.loads(refused[0].content)["error"]["code"] == "insufficient_quota"


async def test_stream_accounting_with_interrupted_streams(tmp_path: Path) -> None:
    usage = FakeUsage(input_tokens=21, output_tokens=13)
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), usage=usage, events=8, chunk_delay=0.01)
    total, interrupted_every = 1000, 10
    async with running_stack(tmp_path, fake=fake) as stack:
        body = json.dumps(CHAT | {"stream": True}).encode()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
            b"content-type: application/json\r\nauthorization: Bearer "
            + stack.keys["openai"].encode()
            + b"\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        limiter = trio.CapacityLimiter(50)

        async def one(index: int) -> None:
            async with limiter:
                sock = await trio.open_tcp_stream("127.0.0.1", stack.gateway.proxy_port)
                try:
                    await sock.send_all(head + body)
                    with trio.fail_after(10):
                        if index % interrupted_every == 0:
                            received = b""
                            while received.count(b"data: {") < 3:  # a few content events, then hang up
                                received += await sock.receive_some(65536)
                        else:
                            while await sock.receive_some(65536):
                                pass
                finally:
                    await sock.aclose()

        async with trio.open_nursery() as nursery:
            for index in range(total):
                nursery.start_soon(one, index)
        rows = await stack.rows(total, timeout=30)
    complete = [r for r in rows if r["outcome"] == "ok"]
    cancelled = [r for r in rows if r["outcome"] == "client_cancelled"]
    assert len(complete) == total - total // interrupted_every
    assert len(cancelled) == total // interrupted_every
    for row in complete:
        assert (row["input_tokens"], row["output_tokens"]) == (21, 13)
        assert row["usage_partial"] is False
    for row in cancelled:
        assert row["usage_partial"] is True
        # OpenAI reports usage only at the end of a stream: the tokens of a broken-off one are estimated.
        assert row["usage_estimated"] is True
        assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    # Nothing that produced tokens is recorded at $0 (or without a cost).
    for row in rows:
        if row["input_tokens"] or row["output_tokens"]:
            assert row["cost_total"] is not None and Decimal(row["cost_total"]) > 0
