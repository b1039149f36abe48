"""A worker's store goes through its supervisor: snapshots (one load per config version for every worker), request
rows and spend sums, over a real socket pair to a real database; and a worker process never loads SQLAlchemy."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.integration.harness import Stack, running_stack
from trioproxy.coordinator import Coordinator
from trioproxy.ipc import ChannelClosed
from trioproxy.limits.model import Measure, Scope
from trioproxy.limits.seed import SpendQuery
from trioproxy.records import RequestRecord
from trioproxy.snapshot import Snapshot
from trioproxy.store.provisioning import update_provider
from trioproxy.store.request_log import recent_requests
from trioproxy.supervisor_store import StoreSources, SupervisorStore, worker_sources
from trioproxy.worker_link import SupervisorLink


@asynccontextmanager
async def _worker_of(stack: Stack) -> AsyncIterator[tuple[StoreSources, SupervisorStore, trio.CancelScope]]:
    """A supervisor's coordinator with a store on the stack's database, and one worker's sources."""
    store = SupervisorStore(stack.engine, stack.box, stack.settings.upstream)
    coordinator = Coordinator(store)
    ours, theirs = socket.socketpair()
    link = SupervisorLink(theirs.detach(), 1)
    async with trio.open_nursery() as nursery:
        supervisor = trio.CancelScope()

        async def serve() -> None:
            with supervisor:
                await coordinator.serve_worker(1, ours)

        nursery.start_soon(serve)
        await nursery.start(link.run)
        yield worker_sources(link), store, supervisor
        nursery.cancel_scope.cancel()


def _record(request_id: str, gateway_key_id: int) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        started_at=time.time(),
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="127.0.0.1",
        status=200,
        gateway_key_id=gateway_key_id,
    )


async def test_snapshots_rows_and_spend_reach_the_worker_through_the_supervisor(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, _worker_of(stack) as (sources, store, _):
        live = stack.gateway.snapshots.current
        # The sources are blocking, like the database functions they stand in for: called in worker threads.
        assert await trio.to_thread.run_sync(sources.read_version) == live.version

        loaded: list[Snapshot] = []

        async def load() -> None:
            loaded.append(await trio.to_thread.run_sync(sources.load_snapshot))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(load)
        assert store.loads == 1  # four workers asking for one version cost one load
        for snapshot in loaded:
            assert snapshot.version == live.version
            assert snapshot.gateway_keys == live.gateway_keys
            assert snapshot.provider_keys == live.provider_keys  # decrypted secrets included
            assert dict(snapshot.providers) == dict(live.providers)
            assert len(snapshot.prices) == len(live.prices)
            assert snapshot.prices.resolve(
                next(iter(live.providers.values())).kind, "gpt-4o-mini"
            ) == live.prices.resolve(next(iter(live.providers.values())).kind, "gpt-4o-mini")

        # A configuration change is a new version: loaded once more.
        provider = next(iter(live.providers.values()))
        await stack.provision(update_provider, provider.id, {"name": "renamed"}, allow_private=True)
        renamed = await trio.to_thread.run_sync(sources.load_snapshot)
        assert renamed.version > live.version
        assert renamed.providers[provider.id].name == "renamed"
        assert store.loads == 2

        key_id = next(iter(live.gateway_keys.values())).id
        stored = await trio.to_thread.run_sync(
            sources.insert_records, [_record(f"through-supervisor-{i}", key_id) for i in range(3)]
        )
        assert stored == 3
        rows = await trio.to_thread.run_sync(recent_requests, stack.engine, 100)
        assert {r["request_id"] for r in rows} >= {f"through-supervisor-{i}" for i in range(3)}
        spent = await trio.to_thread.run_sync(
            sources.spend, [SpendQuery(Scope.GATEWAY_KEY, key_id, Measure.REQUESTS, 0.0)]
        )
        assert spent == [sum(1 for r in rows if r["gateway_key_id"] == key_id)]


async def test_a_call_to_a_gone_supervisor_fails_instead_of_hanging(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, _worker_of(stack) as (sources, _, supervisor):
        supervisor.cancel()  # its end of the pair closes
        with trio.fail_after(5), pytest.raises(ChannelClosed):
            await trio.to_thread.run_sync(sources.read_version)
