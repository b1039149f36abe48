"""Key states shared between gateway instances through Redis, so a key one instance saw fail is avoided by all.

Each instance publishes the state changes its own traffic decided (which ones, and their fields, are in
:mod:`trioproxy.balancer.state_sync`) as one Redis hash per provider key, ``{prefix}:key:{id}``, with a TTL,
and bumps ``{prefix}:version`` in the same MULTI. Every instance polls the version (one GET per ``poll_interval``)
and, when it moved, reads the hashes of the keys in its snapshot and adopts the ones from other
instances that are newer than what it knows. A poll rather than pub/sub keeps every wait bounded and nothing lost
while a connection is down: the hashes are the state of record, the version only says "look again".

Resource handling: :meth:`SharedKeyStates.run` owns one coredis client (and its connection pool) for as long as
Redis answers; the process nursery runs it and cancels it at shutdown.

Error handling: Redis being down or slow never reaches the request path. Every command has a deadline
(``op_timeout``); a failure is logged once per outage, changes stay queued (the latest per key), and the
session is retried every ``retry_interval`` (jittered). The instance keeps balancing on its own meanwhile.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import coredis
import coredis.exceptions
import trio

from trioproxy.balancer.balancer import Balancer
from trioproxy.balancer.health import Transition
from trioproxy.balancer.state_sync import adopt_fields, transition_fields
from trioproxy.redis_client import redis_client
from trioproxy.snapshot import Snapshot

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


class SharedKeyStates:
    """Publishes this instance's key state changes to Redis and merges the other instances' changes."""

    def __init__(
        self,
        balancer: Balancer,
        redis_url: str,
        *,
        prefix: str = "trioproxy:balancer",
        instance_id: str | None = None,
        poll_interval: float = 1.0,
        op_timeout: float = 2.0,
        retry_interval: float = 5.0,
        state_ttl: float = 24 * 3600.0,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        current_snapshot: Callable[[], Snapshot] | None = None,
    ) -> None:
        self._balancer = balancer
        # Keys are read for what the balancer knows; following the live snapshot first means an instance that
        # has not served a pool yet still learns its keys' states before its first request picks one.
        self._current_snapshot = current_snapshot
        self._url = redis_url
        self._prefix = prefix
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._poll_interval = poll_interval
        self._op_timeout = op_timeout
        self._retry_interval = retry_interval
        self._state_ttl = state_ttl
        self._rng = rng or random.Random()
        self._wall_clock = wall_clock
        self._pending: dict[int, dict[str, str]] = {}  # key id -> the latest change not yet published
        self._wakeup = trio.Event()
        self._seen: tuple[str | None, frozenset[int]] | None = (
            None  # (version, key ids) of the last full read
        )
        self._down_since: float | None = None
        self.published = 0
        self.applied = 0
        balancer.subscribe(self._on_transition)

    def __repr__(self) -> str:
        state = "down" if self._down_since is not None else "up"
        return f"<SharedKeyStates {self.instance_id} {state} pending={len(self._pending)}>"

    @property
    def version_key(self) -> str:
        return f"{self._prefix}:version"

    def state_key(self, key_id: int) -> str:
        return f"{self._prefix}:key:{key_id}"

    # -- the balancer's side (synchronous, on the request path) --------------------------------------------------

    def _on_transition(self, transition: Transition) -> None:
        fields = transition_fields(self._balancer, transition, self.instance_id)
        if fields is not None:
            self._pending[transition.key_id] = fields
            self._wakeup.set()

    # -- the task -----------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Share states until cancelled. Reports started at once: Redis being down must not hold up a start."""
        task_status.started()
        while True:
            try:
                await self._session()
            except* _REDIS_ERRORS as group:
                self._went_down(group)
            jitter = self._rng.uniform(0.5, 1.5)
            await trio.sleep(self._retry_interval * jitter)

    async def _session(self) -> None:
        client = redis_client(self._url, connect_timeout=self._op_timeout, stream_timeout=self._op_timeout)
        async with client:
            self._seen = None  # whatever happened while we were away: read everything once
            while True:
                self._wakeup = trio.Event()
                await self._publish(client)
                await self._poll(client)
                self._came_back()
                with trio.move_on_after(self._poll_interval):
                    await self._wakeup.wait()

    async def _publish(self, client: coredis.Redis[str]) -> None:
        while self._pending:
            key_id, fields = next(iter(self._pending.items()))
            ttl = int(self._state_ttl)
            if fields["deadline"]:
                ttl += max(0, int(float(fields["deadline"]) - self._wall_clock()))
            with trio.fail_after(self._op_timeout):
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hset(self.state_key(key_id), fields)
                    pipe.expire(self.state_key(key_id), ttl)
                    pipe.incr(self.version_key)
                    # Outlives every state hash: each lives at most state_ttl past its deadline.
                    pipe.expire(self.version_key, 2 * ttl + int(self._state_ttl))
            # Drop it only if no newer change for the key arrived while we were sending.
            if self._pending.get(key_id) is fields:
                del self._pending[key_id]
            self.published += 1

    async def _poll(self, client: coredis.Redis[str]) -> None:
        with trio.fail_after(self._op_timeout):
            version = await client.get(self.version_key)
        if self._current_snapshot is not None:
            self._balancer.follow(self._current_snapshot(), now=trio.current_time())
        key_ids = self._balancer.key_ids()
        # Read again when something changed, or when the snapshot brought keys not read before.
        seen = (version, frozenset(key_ids))
        if version is None or seen == self._seen:
            return  # nothing was ever published (or nothing changed since the last read)
        if key_ids:
            with trio.fail_after(self._op_timeout):
                async with client.pipeline(transaction=False) as pipe:
                    requests = [pipe.hgetall(self.state_key(key_id)) for key_id in key_ids]
                found = [await request for request in requests]
            for key_id, fields in zip(key_ids, found, strict=True):
                if fields:
                    self._merge(key_id, fields)
        self._seen = seen

    def _merge(self, key_id: int, fields: Mapping[str, Any]) -> None:
        adopted = adopt_fields(
            self._balancer,
            key_id,
            fields,
            origin=self.instance_id,
            wall_now=self._wall_clock(),
            now=trio.current_time(),
        )
        self.applied += adopted

    def _went_down(self, group: BaseExceptionGroup[Exception]) -> None:
        if self._down_since is None:
            self._down_since = trio.current_time()
            first = group.exceptions[0] if group.exceptions else group
            logger.warning(
                "Redis for shared key states is unavailable (%s: %s); balancing on this instance's own view "
                "until it is back",
                type(first).__name__,
                str(first),  # not the exception: a log record must not keep its traceback alive
            )

    def _came_back(self) -> None:
        if self._down_since is not None:
            logger.warning(
                "Redis for shared key states is back after %.1f s", trio.current_time() - self._down_since
            )
            self._down_since = None
