"""``POST /api/provider-keys/{id}/test``: a real, token-free check of a provider key.

The probe lists the provider's models (``GET /v1/models``, or ``/v1beta/models`` for Gemini) with the key: it
costs no tokens, and the answer says whether the key is accepted. It reports the status, the latency to the
response head and how many models the provider listed; it never echoes the provider's body (a readable SSRF
channel otherwise) or the key.

It goes through httpcore on trio with a network backend that applies the SSRF guard to every address the host
name resolves to and connects to the vetted address itself (no second lookup, so DNS rebinding gains nothing);
TLS still verifies the original host name. The stored base URL is re-checked against the current
``allow_private_upstreams`` setting, redirects are never followed (httpcore does not), and the whole probe has one
deadline.
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass
from typing import Any

import httpcore
import orjson
import trio

from trioproxy.errors import TrioProxyError
from trioproxy.headers import build_upstream_headers
from trioproxy.snapshot import ProviderKind
from trioproxy.ssrf import is_address_allowed, parse_base_url
from trioproxy.store.provisioning import ProbeTarget

PROBE_TIMEOUT = 15.0  # the whole probe: resolve, connect, TLS, request, head and body
MAX_BODY = 4 * 1024 * 1024  # model lists are tens of KiB; a larger body is not read further
_MODELS_PATH = {
    ProviderKind.OPENAI: "/v1/models",
    ProviderKind.ANTHROPIC: "/v1/models",
    ProviderKind.GEMINI: "/v1beta/models",
}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    status: int | None
    latency_ms: float
    model_count: int | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "model_count": self.model_count,
            "error": self.error,
        }


class AddressNotAllowed(httpcore.ConnectError):
    """Every address of the host is outside what the SSRF guard allows."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, connecting only to addresses the SSRF guard allows."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = httpcore.TrioBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        with trio.fail_after(timeout if timeout is not None else PROBE_TIMEOUT):
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [
            address for address in addresses if is_address_allowed(address, allow_private=self._allow_private)
        ]
        if not allowed:
            raise AddressNotAllowed("the upstream address is not allowed")
        failure: httpcore.ConnectError | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = httpcore.ConnectError(type(exc).__name__)
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressNotAllowed("unix sockets are not upstreams")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def _model_count(kind: ProviderKind, body: bytes) -> int | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    listed = parsed.get("models" if kind is ProviderKind.GEMINI else "data")
    return len(listed) if isinstance(listed, list) else None


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if status in (401, 403):
        return f"the provider refused the key ({status})"
    if status == 429:
        return "the provider rate-limited the key (429)"
    if status == 404:
        return "the provider has no model list at this base URL (404)"
    return f"the provider answered {status}"


async def probe_key(
    target: ProbeTarget,
    *,
    allow_private: bool,
    user_agent: str,
    time_limit: float = PROBE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> ProbeResult:
    """List the provider's models with the key of ``target`` and report how it went (never raises for
    upstream trouble: that is what the result reports)."""
    start = trio.current_time()

    def result(status: int | None, error: str | None, model_count: int | None = None) -> ProbeResult:
        latency = round((trio.current_time() - start) * 1000, 3)
        return ProbeResult(error is None, status, latency, model_count, error)

    try:
        base = parse_base_url(target.base_url, allow_private=allow_private)
        headers = build_upstream_headers(
            target.kind,
            [],
            secret=target.secret,
            host=base.origin.host_header,
            user_agent=user_agent,
            extra_headers=target.headers,
            content_length=None,
            request_id=uuid.uuid4().hex,
        )
    except TrioProxyError as exc:
        return result(None, f"the provider is misconfigured: {exc.message}")
    url = f"{base.origin.scheme}://{base.origin.host_header}{base.path_prefix}{_MODELS_PATH[target.kind]}"
    connect = min(time_limit, target.connect_timeout or time_limit)
    extensions = {
        "timeout": {"connect": connect, "read": time_limit, "write": time_limit, "pool": time_limit}
    }
    status: int | None = None
    try:
        with trio.fail_after(time_limit):
            async with (
                httpcore.AsyncConnectionPool(
                    network_backend=GuardedBackend(allow_private=allow_private),
                    ssl_context=ssl_context,
                    retries=0,
                ) as pool,
                pool.stream("GET", url, headers=headers, extensions=extensions) as response,
            ):
                status = response.status
                latency = round((trio.current_time() - start) * 1000, 3)
                body = bytearray()
                async for chunk in response.aiter_stream():
                    body += chunk
                    if len(body) > MAX_BODY:
                        break
        error = _status_error(status)
        count = _model_count(target.kind, bytes(body)) if error is None else None
        return ProbeResult(error is None, status, latency, count, error)
    except AddressNotAllowed:
        return result(None, "the upstream address is not allowed (SSRF guard)")
    except (trio.TooSlowError, httpcore.TimeoutException):
        return result(status, "the provider did not answer in time")
    except httpcore.ConnectError:
        return result(None, "could not connect to the provider")
    except (httpcore.NetworkError, httpcore.ProtocolError, OSError):
        return result(status, "the connection to the provider failed")
