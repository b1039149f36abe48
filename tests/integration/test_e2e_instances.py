"""Two gateway instances sharing PostgreSQL and Redis: limits hold across them, and a Redis outage follows the
configured policy."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trio

from tests.integration.harness import Stack, make_settings, running_stack
from tests.redis_support import Relay
from trioproxy.app import RunningGateway, run_gateway
from trioproxy.store.gateway_key_store import update_gateway_key

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def _limit_rpm(stack: Stack, rpm: int, *gateways: RunningGateway) -> None:
    key = next(k for k in stack.gateway.snapshots.current.gateway_keys.values() if k.name == "openai-client")
    await trio.to_thread.run_sync(partial(update_gateway_key, stack.engine, key.id, {"rpm_limit": rpm}))

    def limited(gateway: RunningGateway) -> bool:
        return any(
            k.rpm_limit == rpm for k in gateway.snapshots.current.gateway_keys.values() if k.id == key.id
        )

    for gateway in gateways:
        await stack.wait_for_config(partial(limited, gateway))


async def _fire(
    port: int, key: str, count: int, statuses: list[int], pool: httpcore.AsyncConnectionPool
) -> None:
    async def one() -> None:
        response = await pool.request(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers=[("authorization", f"Bearer {key}"), ("content-type", "application/json")],
            content=CHAT,
        )
        await response.aread()
        statuses.append(response.status)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def _second_gateway(
    nursery: trio.Nursery, data_dir: Path, stack: Stack, **overrides: Any
) -> RunningGateway:
    settings = make_settings(data_dir, database_url=stack.settings.database_url, **overrides)
    gateway: RunningGateway = await nursery.start(partial(run_gateway, settings))
    return gateway


async def test_rpm_100_holds_across_two_instances(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    # A generous Redis deadline: on a CI host busy with other suites a slow answer must not count as an outage.
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "instances": 2,
        "redis_timeout": 5.0,
    }
    statuses: dict[str, list[int]] = {"a": [], "b": []}
    async with running_stack(tmp_path / "a", database_url=postgres_url, **shared) as stack:
        async with trio.open_nursery() as nursery:
            second = await _second_gateway(nursery, tmp_path / "b", stack, **shared)
            await _limit_rpm(stack, 100, stack.gateway, second)
            key = stack.keys["openai"]
            async with httpcore.AsyncConnectionPool(max_connections=64) as pool:
                # 1,000 requests over 10 seconds, alternating between the instances.
                for _ in range(20):
                    async with trio.open_nursery() as wave:
                        wave.start_soon(_fire, stack.gateway.proxy_port, key, 25, statuses["a"], pool)
                        wave.start_soon(_fire, second.proxy_port, key, 25, statuses["b"], pool)
                        wave.start_soon(trio.sleep, 0.5)
            second.request_stop()
    admitted = statuses["a"].count(200) + statuses["b"].count(200)
    print(f"admitted {admitted} of 1000 (a: {statuses['a'].count(200)}, b: {statuses['b'].count(200)})")
    assert len(statuses["a"]) + len(statuses["b"]) == 1000
    assert set(statuses["a"] + statuses["b"]) <= {200, 429}
    assert 95 <= admitted <= 100
    assert statuses["a"].count(200) > 0 and statuses["b"].count(200) > 0


async def test_redis_lost_by_one_instance_falls_back_to_its_share(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    shared: dict[str, Any] = {"redis_prefix": redis_prefix, "instances": 2, "redis_timeout": 5.0}
    async with running_stack(
        tmp_path / "a", database_url=postgres_url, redis_url=redis_url, **shared
    ) as stack:
        async with trio.open_nursery() as nursery:
            relay = Relay()
            await relay.start(nursery)
            second = await _second_gateway(nursery, tmp_path / "b", stack, redis_url=relay.url, **shared)
            await _limit_rpm(stack, 100, stack.gateway, second)
            key = stack.keys["openai"]
            before: list[int] = []
            during_b: list[int] = []
            during_a: list[int] = []
            async with httpcore.AsyncConnectionPool(max_connections=32) as pool:
                await _fire(second.proxy_port, key, 40, before, pool)
                relay.cut()  # instance b loses Redis; a keeps it
                await _fire(second.proxy_port, key, 120, during_b, pool)
                await _fire(stack.gateway.proxy_port, key, 120, during_a, pool)
            second.request_stop()
            nursery.cancel_scope.cancel()
    assert before.count(200) == 40
    # fail_open_local: b alone admits at most its share (100 // 2) while Redis is out of its reach ...
    assert 0 < during_b.count(200) <= 50
    assert set(during_b) <= {200, 429}
    # ... and a, still on Redis, admits what is left of the shared 100.
    assert during_a.count(200) == 60
