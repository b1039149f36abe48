"""Optional, token-free key tests: list the provider's models with the key, and tell the balancer what it showed.

Passive signals (real traffic) drive key health; this only adds what traffic cannot see: whether an ejected or
invalid key works again before a user's request finds out, and whether an idle key was revoked meanwhile
(docs/reliability-plan.md F-13). A model list costs no tokens, unlike the billable completions LiteLLM's health
checks send (#13668, #13782, about $54 in one report).

* What: ``GET /v1/models`` (OpenAI, Anthropic) or ``GET /v1beta/models`` (Gemini), after the provider's path
  prefix, with the provider's own auth header and extra headers
  (:func:`~trioproxy.headers.build_upstream_headers`), through httpcore on trio.
* Which keys: enabled keys that are ejected, half-open or invalid, and keys idle for ``idle_after`` seconds
  (:meth:`Balancer.keys_to_check`); never keys cooling down, whose rate limit a model list cannot judge.
* When: each key at most once per ``interval`` (once a minute by default), jittered by ``jitter`` of it so
  keys and instances do not test in step, with ``concurrency`` tests at a time.
* Verdict: a 2xx moves an ejected, half-open or invalid key back to ACTIVE (:meth:`Balancer.mark_valid`); a
  401/403 makes it INVALID; anything else (a 5xx, a timeout, a refused connection, a 404 from a prefix that
  hides the model list) changes no state and is only shown as the key's last error.
* SSRF: every resolved address passes :func:`~trioproxy.ssrf.is_address_allowed` before a connection is made,
  exactly as for proxied requests; TLS still verifies the configured host name.

Resource handling: :meth:`ActiveChecker.run` owns one httpcore connection pool and a nursery of tests; each
test runs under ``timeout``. Cancelling ``run`` closes the pool.

Error handling: a failing test is a finding about the key, never an exception out of ``run``.
"""

from __future__ import annotations

import enum
import logging
import random
import socket
import ssl
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import trio

from trioproxy.balancer.balancer import Balancer
from trioproxy.errors import ConfigError
from trioproxy.headers import build_upstream_headers
from trioproxy.snapshot import ProviderKeyView, ProviderKind, ProviderView, Snapshot
from trioproxy.ssrf import is_address_allowed

logger = logging.getLogger(__name__)

MODEL_LIST_PATHS = {
    ProviderKind.OPENAI: "/v1/models",
    ProviderKind.ANTHROPIC: "/v1/models",
    ProviderKind.GEMINI: "/v1beta/models",
}
MAX_BODY = 1024 * 1024  # a model list is tens of KiB; read no more than this of any answer


@dataclass(frozen=True, slots=True)
class ActiveCheckSettings:
    interval: float = 60.0  # per key (docs/reliability-plan.md: at most once a minute)
    jitter: float = 0.2  # +-20 % of the interval
    idle_after: float = 300.0  # a key unused this long is tested too
    timeout: float = 10.0  # the whole test: connect, TLS, answer
    concurrency: int = 4
    tick: float = 1.0  # how often due keys are looked for


class CheckOutcome(enum.StrEnum):
    VALID = "valid"  # the provider accepted the key
    REJECTED = "rejected"  # 401/403: the key itself is refused
    INCONCLUSIVE = "inconclusive"  # the test could not tell (upstream down, timeout, odd status)


@dataclass(frozen=True, slots=True)
class CheckResult:
    outcome: CheckOutcome
    status: int | None
    detail: str


class CheckSchedule:
    """When each key is next due. Pure: ``now`` is ``trio.current_time()``."""

    def __init__(self, settings: ActiveCheckSettings, rng: random.Random) -> None:
        self._settings = settings
        self._rng = rng
        self._next: dict[int, float] = {}

    def due(self, key_ids: Iterable[int], now: float) -> list[int]:
        """The keys among ``key_ids`` whose test is due now; each is then scheduled one jittered interval on.
        A key seen for the first time waits a random part of an interval, so a restart does not test every key
        at once. Keys not in ``key_ids`` are forgotten."""
        wanted = list(dict.fromkeys(key_ids))
        keep = set(wanted)
        self._next = {k: v for k, v in self._next.items() if k in keep}
        due: list[int] = []
        for key_id in wanted:
            next_at = self._next.get(key_id)
            if next_at is None:
                self._next[key_id] = now + self._rng.uniform(0.0, self._settings.interval)
            elif now >= next_at:
                due.append(key_id)
                self._next[key_id] = now + self._jittered()
        return due

    def _jittered(self) -> float:
        spread = self._settings.jitter
        return self._settings.interval * self._rng.uniform(1.0 - spread, 1.0 + spread)


class GuardedTrioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, connecting only to addresses the SSRF guard allows."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = httpcore.TrioBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's AsyncNetworkBackend interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError:
            raise httpcore.ConnectError(f"cannot resolve {host}") from None
        addresses = [str(info[4][0]) for info in infos]
        allowed = [
            a for a in dict.fromkeys(addresses) if is_address_allowed(a, allow_private=self._allow_private)
        ]
        if not allowed:
            raise httpcore.ConnectError(f"{host} resolves only to addresses that are not allowed")
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's AsyncNetworkBackend interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("key tests never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class ActiveChecker:
    """Tests keys in the background; one per process, in the process nursery (see the module docs)."""

    def __init__(
        self,
        balancer: Balancer,
        snapshots: Callable[[], Snapshot],
        *,
        allow_private: bool,
        user_agent: str,
        settings: ActiveCheckSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._balancer = balancer
        self._snapshots = snapshots
        self._allow_private = allow_private
        self._user_agent = user_agent
        self.settings = settings or ActiveCheckSettings()
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._schedule = CheckSchedule(self.settings, rng or random.Random())
        self._limiter = trio.CapacityLimiter(self.settings.concurrency)
        self._pool: httpcore.AsyncConnectionPool | None = None
        self.checks_run = 0

    def __repr__(self) -> str:
        return f"<ActiveChecker checks_run={self.checks_run}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpcore.AsyncConnectionPool(
            ssl_context=self._ssl_context,
            max_connections=self.settings.concurrency,
            keepalive_expiry=self.settings.interval / 2,
            network_backend=GuardedTrioBackend(allow_private=self._allow_private),
        ) as pool:
            self._pool = pool
            try:
                task_status.started()
                while True:
                    await self.check_due()
                    await trio.sleep(self.settings.tick)
            finally:
                self._pool = None

    async def check_due(self) -> list[int]:
        """Test every key that is due now; returns their ids."""
        snapshot = self._snapshots()
        now = trio.current_time()
        candidates = self._balancer.keys_to_check(snapshot, now=now, idle_after=self.settings.idle_after)
        due = self._schedule.due(candidates, now)
        async with trio.open_nursery() as nursery:
            for key_id in due:
                nursery.start_soon(self.check_key, snapshot, key_id)
        return due

    async def check_key(self, snapshot: Snapshot, key_id: int) -> CheckResult | None:
        """Test one key now and apply the verdict (also for an admin's "test key"); None when the key or its
        provider is not in the snapshot or is disabled."""
        key = snapshot.provider_keys.get(key_id)
        provider = snapshot.providers.get(key.provider_id) if key is not None else None
        if key is None or provider is None or not key.enabled or not provider.enabled:
            return None
        async with self._limiter:
            result = await self.list_models(provider, key)
        self.checks_run += 1
        self._apply(key, result)
        return result

    async def list_models(self, provider: ProviderView, key: ProviderKeyView) -> CheckResult:
        """List the provider's models with ``key``; changes nothing by itself."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the active checker is not running")
        origin = provider.origin
        target = provider.path_prefix + MODEL_LIST_PATHS[provider.kind]
        try:
            headers = build_upstream_headers(
                provider.kind,
                [],
                secret=key.secret,
                host=origin.host_header,
                user_agent=self._user_agent,
                extra_headers=provider.extra_headers,
                content_length=None,
                request_id=str(uuid.uuid4()),
            )
        except ConfigError as exc:
            return CheckResult(CheckOutcome.INCONCLUSIVE, None, f"cannot build the request: {exc.message}")
        url = httpcore.URL(
            scheme=origin.scheme.encode(), host=origin.host.encode(), port=origin.port, target=target.encode()
        )
        timeout = self.settings.timeout
        extensions = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
        try:
            with trio.fail_after(timeout):
                async with pool.stream(b"GET", url, headers=headers, extensions=extensions) as response:
                    received = 0
                    async for chunk in response.aiter_stream():
                        received += len(chunk)
                        if received > MAX_BODY:
                            break
                    status = response.status
        except (trio.TooSlowError, httpcore.TimeoutException):
            return CheckResult(CheckOutcome.INCONCLUSIVE, None, f"no answer within {timeout:g} s")
        except httpcore.ConnectError as exc:
            return CheckResult(CheckOutcome.INCONCLUSIVE, None, f"connect failed: {exc}")
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            return CheckResult(CheckOutcome.INCONCLUSIVE, None, f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return CheckResult(CheckOutcome.VALID, status, f"model list answered {status}")
        if status in (401, 403):
            return CheckResult(CheckOutcome.REJECTED, status, f"provider rejected the key (HTTP {status})")
        return CheckResult(CheckOutcome.INCONCLUSIVE, status, f"model list answered HTTP {status}")

    def _apply(self, key: ProviderKeyView, result: CheckResult) -> None:
        now = trio.current_time()
        if result.outcome is CheckOutcome.VALID:
            self._balancer.mark_valid(key.id, now=now, reason=f"key test: {result.detail}")
        elif result.outcome is CheckOutcome.REJECTED:
            self._balancer.mark_invalid(key.id, f"key test: {result.detail}", now=now)
        else:
            self._balancer.note_error(key.id, f"key test: {result.detail}", now=now)
            logger.info("provider key %d (%s): key test inconclusive: %s", key.id, key.name, result.detail)
