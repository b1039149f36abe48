"""A whole stack for end-to-end tests: fake upstream <- trioproxy <- a client, on real sockets.

``running_stack`` starts the fake upstream and the gateway in one nursery, provisions one provider, provider key
and gateway key per provider kind through the store's provisioning functions (the same code the CLI runs), and
yields a :class:`Stack` with everything a test needs to drive requests and read the request rows back.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from sqlalchemy import Engine

from trioproxy.app import ControlPlane, RunningGateway, open_store, run_gateway
from trioproxy.crypto import SecretBox
from trioproxy.settings import MeteringSettings, Settings
from trioproxy.store.db import run_migrations
from trioproxy.store.provisioning import add_provider, add_provider_key, create_gateway_key
from trioproxy.store.request_log import recent_requests
from trioproxy.testing.fake_upstream import FakeUpstream

UPSTREAM_SECRET = "sk-upstream-test"
KINDS = ("openai", "anthropic", "gemini")


@dataclass
class Stack:
    settings: Settings
    gateway: RunningGateway
    fake: FakeUpstream
    fake_port: int
    engine: Engine
    box: SecretBox
    keys: dict[str, str] = field(default_factory=dict)  # provider kind -> gateway key

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.proxy_port}"

    async def rows(self, count: int, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The newest `count` request rows (newest first), waiting until the metering writer stored them."""
        with trio.fail_after(timeout):
            while True:
                rows = await trio.to_thread.run_sync(recent_requests, self.engine, 1000)
                if len(rows) >= count:
                    return rows[:count]
                await trio.sleep(0.05)

    async def wait_for_config(self, predicate: Callable[[], bool], *, timeout: float = 1.0) -> float:
        """Wait until the live snapshot satisfies `predicate`; returns the seconds it took."""
        start = trio.current_time()
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.01)
        return trio.current_time() - start

    async def provision(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(self.engine, *args, **kwargs))


def make_settings(data_dir: Path, *, database_url: str = "", **overrides: Any) -> Settings:
    return Settings(
        proxy_host="127.0.0.1",
        proxy_port=0,
        data_dir=data_dir,
        database_url=database_url,
        secret_key="test-master-key",
        allow_private_upstreams=True,
        config_poll_interval=0.05,
        metering=MeteringSettings(flush_interval=0.02),
        **overrides,
    )


@asynccontextmanager
async def running_stack(
    data_dir: Path,
    *,
    database_url: str = "",
    fake: FakeUpstream | None = None,
    upstream_ssl: ssl.SSLContext | None = None,
    client_ssl: ssl.SSLContext | None = None,
    control_plane: ControlPlane | None = None,
    **settings_overrides: Any,
) -> AsyncIterator[Stack]:
    fake = fake or FakeUpstream(accepted_keys=(UPSTREAM_SECRET,))
    settings = make_settings(data_dir, database_url=database_url, **settings_overrides)
    if database_url:
        await trio.to_thread.run_sync(run_migrations, database_url)
    engine, box = await trio.to_thread.run_sync(open_store, settings)
    try:
        async with trio.open_nursery() as nursery:
            fake_port: int = await nursery.start(
                lambda task_status: fake.serve(ssl_context=upstream_ssl, task_status=task_status)
            )
            scheme = "https" if upstream_ssl is not None else "http"
            host = "localhost" if upstream_ssl is not None else "127.0.0.1"
            keys: dict[str, str] = {}
            for kind in KINDS:
                await trio.to_thread.run_sync(
                    partial(
                        add_provider,
                        engine,
                        name=f"{kind}-fake",
                        kind=kind,
                        base_url=f"{scheme}://{host}:{fake_port}",
                        allow_private=True,
                    )
                )
                await trio.to_thread.run_sync(
                    partial(
                        add_provider_key,
                        engine,
                        box,
                        provider=f"{kind}-fake",
                        name=f"{kind}-key-1",
                        secret=UPSTREAM_SECRET,
                    )
                )
                created = await trio.to_thread.run_sync(
                    partial(create_gateway_key, engine, name=f"{kind}-client", provider=f"{kind}-fake")
                )
                keys[kind] = created["key"]
            async with trio.open_nursery() as gateway_nursery:
                gateway: RunningGateway = await gateway_nursery.start(
                    lambda task_status: run_gateway(
                        settings, ssl_context=client_ssl, control_plane=control_plane, task_status=task_status
                    )
                )
                stack = Stack(settings, gateway, fake, fake_port, engine, box, keys)
                try:
                    await stack.wait_for_config(
                        lambda: len(gateway.snapshots.current.gateway_keys) >= len(KINDS)
                    )
                    yield stack
                finally:
                    # The gateway drains and flushes while the fake upstream is still up.
                    gateway.request_stop()
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(engine.dispose)
