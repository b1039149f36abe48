"""Load balancing, key health and failover end to end: the fake upstream fails per provider key."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trio

from tests.integration.harness import UPSTREAM_SECRET, Stack, running_stack
from trioproxy.store.provisioning import add_provider_key, create_gateway_key
from trioproxy.testing.fake_upstream import FakeUpstream, Fault

SECRETS = {"a": "sk-key-a", "b": "sk-key-b", "c": "sk-key-c"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _fake(**kwargs: Any) -> FakeUpstream:
    return FakeUpstream(accepted_keys=(UPSTREAM_SECRET, *SECRETS.values()), **kwargs)


async def _pool_key(stack: Stack, *, strategy: str, weights: dict[str, int], retry_count: int) -> str:
    """A gateway key over provider keys a/b/c of the OpenAI provider with the given weights."""
    for name, weight in weights.items():
        await trio.to_thread.run_sync(
            partial(
                add_provider_key,
                stack.engine,
                stack.box,
                provider="openai-fake",
                name=f"key-{name}",
                secret=SECRETS[name],
                weight=weight,
            )
        )
    created = await trio.to_thread.run_sync(
        partial(
            create_gateway_key,
            stack.engine,
            name=f"pool-{strategy}",
            provider="openai-fake",
            provider_keys=[f"key-{name}" for name in weights],
            strategy=strategy,
            retry_count=retry_count,
        )
    )
    key: str = created["key"]
    await stack.wait_for_config(
        lambda: any(
            g.name == f"pool-{strategy}" for g in stack.gateway.snapshots.current.gateway_keys.values()
        )
    )
    return key


def _used_key(headers: list[tuple[str, str]]) -> str:
    secret = dict(headers)["authorization"].removeprefix("Bearer ")
    return next((name for name, value in SECRETS.items() if value == secret), "other")


async def _chat(
    pool: httpcore.AsyncConnectionPool, stack: Stack, key: str, body: dict[str, Any] = CHAT
) -> httpcore.Response:
    response = await pool.request(
        "POST",
        stack.base_url + "/v1/chat/completions",
        headers=[("authorization", f"Bearer {key}"), ("content-type", "application/json")],
        content=json.dumps(body).encode(),
    )
    await response.aread()
    return response


def _key_states(stack: Stack, pool_name: str) -> dict[str, dict[str, Any]]:
    gateway = stack.gateway
    status = gateway.balancer.status(gateway.snapshots.current, now=trio.current_time())
    [pool] = [p for p in status if p["gateway_key_name"] == pool_name]
    return {k["name"].removeprefix("key-"): k for k in pool["keys"]}


async def test_weights_three_two_one_over_600_requests(tmp_path: Path) -> None:
    async with running_stack(tmp_path, fake=_fake()) as stack:
        key = await _pool_key(stack, strategy="weighted", weights={"a": 3, "b": 2, "c": 1}, retry_count=0)
        async with httpcore.AsyncConnectionPool() as pool:
            for _ in range(600):
                assert (await _chat(pool, stack, key)).status == 200
        counts = Counter(_used_key(c.headers) for c in stack.fake.captured)
    for name, expected in {"a": 300, "b": 200, "c": 100}.items():
        assert abs(counts[name] - expected) <= 6, counts


async def test_a_failing_key_is_ejected_and_clients_see_no_error(tmp_path: Path) -> None:
    fake = _fake()
    fake.add_fault(Fault(status=500), api_key=SECRETS["b"], forever=True)
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="round_robin", weights={"a": 1, "b": 1, "c": 1}, retry_count=2)
        async with httpcore.AsyncConnectionPool() as pool:
            statuses = [(await _chat(pool, stack, key)).status for _ in range(40)]
        states = _key_states(stack, "pool-round_robin")
        counts = Counter(_used_key(c.headers) for c in stack.fake.captured)
        rows = await stack.rows(40)
    assert statuses == [200] * 40
    assert states["b"]["state"] == "ejected"
    assert states["a"]["state"] == states["c"]["state"] == "active"
    # Ejected after its consecutive failures; the rest of the traffic went to a and c.
    assert counts["b"] == 5
    retried = [r for r in rows if r["attempts"] == 2]
    assert len(retried) == 5
    for row in retried:
        log = json.loads(row["attempt_log"])
        assert log[0]["status"] == 500 and log[1]["status"] == 200
        assert log[0]["key"] != log[1]["key"]


async def test_a_429_with_retry_after_takes_the_key_out_for_that_long(tmp_path: Path) -> None:
    fake = _fake()
    fake.add_fault(Fault(status=429, headers=(("retry-after", "2"),)), api_key=SECRETS["a"])
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="round_robin", weights={"a": 1, "b": 1}, retry_count=1)
        async with httpcore.AsyncConnectionPool() as pool:
            first = await _chat(pool, stack, key)  # a answers 429, the retry on b succeeds
            assert first.status == 200
            cooled = _key_states(stack, "pool-round_robin")["a"]
            assert cooled["state"] == "cooling_down"
            stack.fake.captured.clear()
            started = trio.current_time()
            while trio.current_time() - started < 1.5:
                assert (await _chat(pool, stack, key)).status == 200
            assert {_used_key(c.headers) for c in stack.fake.captured} == {"b"}
            await trio.sleep(2.0 - (trio.current_time() - started) + 0.2)
            stack.fake.captured.clear()
            for _ in range(4):
                assert (await _chat(pool, stack, key)).status == 200
            assert "a" in {_used_key(c.headers) for c in stack.fake.captured}
    assert 1.5 <= cooled["deadline_in"] <= 2.0


async def test_an_error_as_first_event_is_retried_and_the_client_sees_a_clean_stream(tmp_path: Path) -> None:
    fake = _fake(events=4)
    fake.add_fault(Fault(inband_error=True), api_key=SECRETS["a"])
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="round_robin", weights={"a": 1, "b": 1}, retry_count=1)
        async with httpcore.AsyncConnectionPool() as pool:
            response = await _chat(pool, stack, key, CHAT | {"stream": True})
        [row] = await stack.rows(1)
    assert response.status == 200
    assert b'"error"' not in response.content
    assert response.content.rstrip().endswith(b"data: [DONE]")
    assert row["attempts"] == 2
    assert row["outcome"] == "ok"
    log = json.loads(row["attempt_log"])
    assert log[0]["error"] == "error event as the first event"


async def test_a_stream_that_fails_after_its_first_byte_is_not_retried(tmp_path: Path) -> None:
    fake = _fake(events=6)
    fake.add_fault(Fault(die_after_events=3))
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="round_robin", weights={"a": 1, "b": 1}, retry_count=2)
        async with httpcore.AsyncConnectionPool() as pool:
            with pytest.raises(httpcore.RemoteProtocolError):
                await _chat(pool, stack, key, CHAT | {"stream": True})
        [row] = await stack.rows(1)
        upstream_requests = len(stack.fake.captured)
    assert upstream_requests == 1
    assert row["attempts"] == 1
    assert row["outcome"] == "upstream_died"


async def test_one_key_500s_another_429s_and_every_request_is_served(tmp_path: Path) -> None:
    fake = _fake()
    fake.add_fault(Fault(status=500), api_key=SECRETS["a"], forever=True)
    fake.add_fault(Fault(status=429, headers=(("retry-after", "30"),)), api_key=SECRETS["b"], forever=True)
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="weighted", weights={"a": 1, "b": 1, "c": 1}, retry_count=2)
        async with httpcore.AsyncConnectionPool() as pool:
            statuses = [(await _chat(pool, stack, key)).status for _ in range(30)]
        states = _key_states(stack, "pool-weighted")
    assert statuses == [200] * 30
    assert states["b"]["state"] == "cooling_down"
    assert states["c"]["state"] == "active"
    assert states["a"]["state"] == "ejected"
    assert "500" in states["a"]["last_error"]


async def test_when_every_key_is_down_the_pool_panics_instead_of_refusing(tmp_path: Path) -> None:
    fake = _fake()
    fake.add_fault(Fault(status=429, headers=(("retry-after", "30"),)), api_key=SECRETS["a"])
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="round_robin", weights={"a": 1}, retry_count=0)
        async with httpcore.AsyncConnectionPool() as pool:
            limited = await _chat(pool, stack, key)
            assert limited.status == 429
            served = await _chat(pool, stack, key)
        rows = await stack.rows(2)
    assert served.status == 200
    assert dict(served.headers)[b"x-trioproxy-panic"] == b"1"
    assert rows[0]["panic"] is True


async def test_an_error_first_event_with_no_other_key_reaches_the_client_and_is_recorded(
    tmp_path: Path,
) -> None:
    fake = _fake(events=4)
    fake.add_fault(Fault(inband_error=True), api_key=SECRETS["a"])
    async with running_stack(tmp_path, fake=fake) as stack:
        key = await _pool_key(stack, strategy="round_robin", weights={"a": 1}, retry_count=2)
        async with httpcore.AsyncConnectionPool() as pool:
            response = await _chat(pool, stack, key, CHAT | {"stream": True})
        [row] = await stack.rows(1)
    assert response.status == 200
    assert b'"error"' in response.content
    assert row["attempts"] == 1
    assert row["outcome"] == "upstream_error"
    # An error in place of an answer is not a broken-off answer: nothing is estimated, nothing is charged.
    assert row["usage_estimated"] is False
    assert row["input_tokens"] == row["output_tokens"] == 0
