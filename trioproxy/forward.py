"""The data plane's request path: one client request, one provider exchange, one metering record.

``Forwarder`` is the :class:`~trioproxy.server.Handler` and :class:`~trioproxy.server.Rejector` of the proxy
server. For each request it matches the route, authenticates the gateway key against the in-memory snapshot (no
database on the hot path), picks a provider key from the key's pool, builds the upstream request from scratch, and
streams the provider's answer back as it arrives while the usage meter reads tokens from the same bytes. Whatever
happens, exactly one :class:`~trioproxy.records.RequestRecord` is handed to the metering writer at the end.

Error handling: refusals before the upstream is contacted are answered in the client's own API dialect with the
matching status. Upstream failures before the first byte reached the client become a 502/504 in the dialect; after
that the stream is ended with one in-band error event and a truncated body (never a fake clean end). A client that
leaves cancels the handler (the server cancels its scope): the upstream connection is then closed, never reused.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from trioproxy.dialects import error_body, stream_error_event
from trioproxy.errors import ClientGoneError, TrioProxyError
from trioproxy.gateway_keys import has_valid_checksum, hash_gateway_key
from trioproxy.headers import (
    build_upstream_headers,
    client_address,
    extract_gateway_key,
    filter_response_headers,
    redact,
)
from trioproxy.metering import MeteringWriter
from trioproxy.openai_stream import UsageChunkStripper, prepare_stream_usage
from trioproxy.pool import ConnectionPool, ExchangeTimeouts, UpstreamRequest, UpstreamResponse
from trioproxy.records import Outcome, RequestRecord
from trioproxy.reloader import SnapshotHolder
from trioproxy.request_guard import RequestHead
from trioproxy.rotation import PoolRotation
from trioproxy.routes import Route, RouteRejection, guess_dialect, match_route
from trioproxy.server import ClientRequest, ResponseSink
from trioproxy.settings import Settings
from trioproxy.snapshot import GatewayKeyView, ProviderKind, ProviderView, Snapshot
from trioproxy.usage import StreamFormat, UsageMeter

logger = logging.getLogger(__name__)

JSON_HEADERS = (b"content-type", b"application/json")
# OpenAI routes whose streams report usage only when asked (stream_options.include_usage).
INCLUDE_USAGE_ROUTES = frozenset({"openai.chat_completions", "openai.completions"})

Headers = list[tuple[bytes, bytes]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Refusal(TrioProxyError):
    """The gateway refuses the request before contacting the provider; answered in the client's dialect."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status_hint=status)


@dataclass(slots=True)
class _Exchange:
    """What one request learns as it goes; read by the metering step at the end."""

    record: RequestRecord
    kind: ProviderKind
    started: float  # trio.current_time()
    snapshot: Snapshot
    route: Route | None = None
    fmt: StreamFormat = StreamFormat.JSON
    meter: UsageMeter | None = None
    bytes_to_client: int = 0
    notes: list[str] = field(default_factory=list)


class Forwarder:
    """Serves proxied requests. One instance per process; it holds no per-request state."""

    def __init__(
        self,
        settings: Settings,
        snapshots: SnapshotHolder,
        pool: ConnectionPool,
        metering: MeteringWriter,
        rotation: PoolRotation | None = None,
    ) -> None:
        self._settings = settings
        self._snapshots = snapshots
        self._pool = pool
        self._metering = metering
        self._rotation = rotation or PoolRotation()
        self._trusted_proxies: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies
        )

    # -- the Handler ------------------------------------------------------------------------------------------

    async def __call__(self, request: ClientRequest, response: ResponseSink) -> None:
        record = RequestRecord(
            request_id=str(uuid.uuid4()),
            started_at=time.time(),
            route="unknown",
            method=request.method,
            path=request.path,
            client_ip=client_address(request.peer_ip, request.headers, self._trusted_proxies),
        )
        snapshot = self._snapshots.current
        exchange = _Exchange(
            record=record,
            kind=guess_dialect(request.path, request.headers),
            started=trio.current_time(),
            snapshot=snapshot,
        )
        try:
            await self._serve(request, response, exchange)
        except _Refusal as refusal:
            record.outcome = Outcome.REJECTED
            record.error = refusal.message
            await self._send_error(response, exchange, refusal.status_hint, refusal.message)
        except ClientGoneError:
            record.outcome = Outcome.CLIENT_CANCELLED
        finally:
            self._finish(request, exchange)

    def _finish(self, request: ClientRequest, exchange: _Exchange) -> None:
        """Close the record (runs even while the handler is being cancelled) and hand it to metering."""
        record = exchange.record
        record.duration_ms = (trio.current_time() - exchange.started) * 1000.0
        complete = False
        if exchange.meter is not None:
            usage = exchange.meter.finish()
            complete = usage.complete
            record.usage = usage
            answered = 0 < record.status < 400
            record.usage_partial = answered and not usage.complete
            route = exchange.route
            if route is not None and route.billable and answered:
                model = usage.response_model or record.model
                record.cost = exchange.snapshot.prices.cost(exchange.kind, model, usage)
                record.price_missing = record.cost is None
        # A client that hangs up right after the dialect's terminal event ([DONE], message_stop) got its whole
        # answer: SDKs close the connection as soon as they have read it, before the final empty chunk.
        if request.disconnected.is_set() and record.outcome is Outcome.OK and not complete:
            record.outcome = Outcome.CLIENT_CANCELLED
        if record.status == 0 and record.outcome is Outcome.CLIENT_CANCELLED:
            record.status = 499
        self._metering.submit(record)

    # -- the Rejector -----------------------------------------------------------------------------------------

    def reject(
        self, status: int, message: str, head: RequestHead | None, peer_ip: str
    ) -> tuple[Headers, bytes]:
        """Answer a request the server refused while parsing it, and record it."""
        target = head.target if head is not None else ""
        path = target.split("?", 1)[0]
        headers = list(head.headers) if head is not None else []
        kind = guess_dialect(path, headers)
        request_id = str(uuid.uuid4())
        self._metering.submit(
            RequestRecord(
                request_id=request_id,
                started_at=time.time(),
                route="unknown",
                method=head.method if head is not None else "",
                path=path[:2048],
                client_ip=client_address(peer_ip, headers, self._trusted_proxies),
                status=status,
                outcome=Outcome.REJECTED,
                error=message,
                duration_ms=0.0,
            )
        )
        return [JSON_HEADERS, (b"x-request-id", request_id.encode())], error_body(kind, status, message)

    # -- the steps --------------------------------------------------------------------------------------------

    async def _serve(self, request: ClientRequest, response: ResponseSink, exchange: _Exchange) -> None:
        record = exchange.record
        matched = match_route(request.method, request.target, request.headers)
        if isinstance(matched, RouteRejection):
            exchange.kind = matched.kind
            raise _Refusal(matched.status, matched.message)
        route = matched
        exchange.route = route
        exchange.kind = route.kind
        record.route = route.name

        gateway_key = self._authenticate(request, route, exchange.snapshot)
        provider = exchange.snapshot.providers[gateway_key.provider_id]
        record.gateway_key_id = gateway_key.id
        record.user_id = gateway_key.owner_id
        record.provider_id = provider.id
        record.provider_kind = provider.kind.value

        body_json = _parse_body(route, request.body)
        model = route.model or _str_or_none(body_json.get("model"))
        record.model = model
        exchange.fmt = _stream_format(route, body_json)
        record.stream = exchange.fmt is not StreamFormat.JSON
        _check_model_allowed(gateway_key, model)

        body = request.body if route.has_body else b""
        strip_usage = False
        if route.name in INCLUDE_USAGE_ROUTES and record.stream:
            prepared, client_asked = prepare_stream_usage(body_json)
            if not client_asked:
                body = json.dumps(prepared, separators=(",", ":"), ensure_ascii=False).encode()
                strip_usage = True

        provider_key = self._rotation.pick(gateway_key, exchange.snapshot.provider_keys)
        if provider_key is None:
            raise _Refusal(503, "no provider key of this gateway key's pool is available")
        record.provider_key_id = provider_key.id

        target = provider.path_prefix + route.upstream_path
        if route.upstream_query:
            target += "?" + route.upstream_query
        upstream_request = UpstreamRequest(
            method=route.method.encode(),
            target=target.encode(),
            headers=build_upstream_headers(
                route.kind,
                request.headers,
                secret=provider_key.secret,
                host=provider.origin.host_header,
                user_agent=self._settings.upstream.user_agent,
                extra_headers=provider.extra_headers,
                content_length=len(body) if route.has_body else None,
                request_id=record.request_id,
            ),
            body=body,
        )
        await self._exchange(
            request, response, exchange, provider, gateway_key, upstream_request, strip_usage
        )

    def _authenticate(self, request: ClientRequest, route: Route, snapshot: Snapshot) -> GatewayKeyView:
        key = extract_gateway_key(request.headers, request.query)
        if key is None:
            raise _Refusal(401, "missing API key: send the gateway key as a bearer token or API key header")
        gateway_key = snapshot.gateway_keys.get(hash_gateway_key(key)) if has_valid_checksum(key) else None
        if gateway_key is None:
            raise _Refusal(401, "invalid API key")
        if not gateway_key.enabled:
            raise _Refusal(401, "this API key is disabled")
        if gateway_key.expires_at is not None and time.time() >= gateway_key.expires_at:
            raise _Refusal(401, "this API key has expired")
        provider = snapshot.providers.get(gateway_key.provider_id)
        if provider is None or not provider.enabled:
            raise _Refusal(401, "this API key's provider is disabled")
        if provider.kind is not route.kind:
            raise _Refusal(403, f"this API key is for the {provider.kind.value} API, not {route.kind.value}")
        return gateway_key

    async def _exchange(
        self,
        request: ClientRequest,
        response: ResponseSink,
        exchange: _Exchange,
        provider: ProviderView,
        gateway_key: GatewayKeyView,
        upstream_request: UpstreamRequest,
        strip_usage: bool,
    ) -> None:
        record = exchange.record
        timeouts = ExchangeTimeouts(
            connect=provider.connect_timeout,
            first_byte=gateway_key.first_byte_timeout or provider.first_byte_timeout,
            idle=provider.idle_timeout,
        )
        record.attempts = 1
        failure: TrioProxyError | None = None
        with trio.move_on_after(gateway_key.total_timeout or provider.total_timeout) as deadline:
            try:
                async with self._pool.exchange(provider.origin, upstream_request, timeouts) as upstream:
                    record.ttfb_ms = (trio.current_time() - exchange.started) * 1000.0
                    record.status = upstream.status
                    if upstream.status >= 400:
                        record.outcome = Outcome.UPSTREAM_ERROR
                        record.error = f"provider answered {upstream.status}"
                    await self._relay(response, exchange, upstream, strip_usage)
            except ClientGoneError:
                raise
            except TrioProxyError as exc:
                failure = exc
        if deadline.cancelled_caught:
            failure = TrioProxyError("the request exceeded its total deadline", status_hint=504)
        if failure is not None:
            await self._upstream_failed(response, exchange, failure)

    async def _relay(
        self, response: ResponseSink, exchange: _Exchange, upstream: UpstreamResponse, strip_usage: bool
    ) -> None:
        """Stream the provider's answer to the client as it arrives, metering the same bytes."""
        fmt = exchange.fmt if upstream.status < 400 else StreamFormat.JSON
        meter = exchange.meter = UsageMeter(exchange.kind, fmt)
        stripper = UsageChunkStripper() if strip_usage and upstream.status < 400 else None
        headers = filter_response_headers(upstream.headers)
        headers.append((b"x-request-id", exchange.record.request_id.encode()))
        content_length = None if stripper is not None else _content_length(upstream.headers)
        await response.start(upstream.status, headers, content_length=content_length)
        while True:
            data = await upstream.receive_some()
            if not data:
                break
            meter.feed(data)
            out = stripper.feed(data) if stripper is not None else data
            if out:
                exchange.bytes_to_client += len(out)
                await response.send(out)
        if stripper is not None:
            tail = stripper.flush()
            if tail:
                await response.send(tail)
        await response.end()

    async def _upstream_failed(
        self, response: ResponseSink, exchange: _Exchange, failure: TrioProxyError
    ) -> None:
        record = exchange.record
        record.outcome = Outcome.UPSTREAM_DIED
        record.error = redact(failure.message)
        logger.warning("request %s: upstream failed: %s", record.request_id, record.error)
        if not response.started:
            record.status = failure.status_hint
            await self._send_error(response, exchange, failure.status_hint, f"upstream error: {record.error}")
            return
        # The answer already started: end it with one in-band error and a truncated body.
        if exchange.fmt is not StreamFormat.JSON and record.status < 400:
            event = stream_error_event(
                exchange.kind,
                exchange.fmt,
                f"upstream error: {record.error}",
                status=failure.status_hint,
                first_element=exchange.bytes_to_client == 0,
            )
            try:
                await response.send(event)
            except ClientGoneError:
                record.outcome = Outcome.CLIENT_CANCELLED
        await response.abort()

    async def _send_error(
        self, response: ResponseSink, exchange: _Exchange, status: int, message: str
    ) -> None:
        exchange.record.status = status
        if response.started:
            await response.abort()
            return
        body = error_body(exchange.kind, status, message)
        headers = [JSON_HEADERS, (b"x-request-id", exchange.record.request_id.encode())]
        try:
            await response.start(status, headers, content_length=len(body))
            await response.send(body)
            await response.end()
        except ClientGoneError:
            exchange.record.outcome = Outcome.CLIENT_CANCELLED


def _parse_body(route: Route, body: bytes) -> dict[str, Any]:
    if not route.has_body:
        return {}
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refusal(400, f"the request body is not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(parsed, dict):
        raise _Refusal(400, "the request body must be a JSON object")
    return parsed


def _stream_format(route: Route, body: dict[str, Any]) -> StreamFormat:
    if route.stream_format is not None:
        return route.stream_format
    return StreamFormat.SSE if body.get("stream") is True else StreamFormat.JSON


def _check_model_allowed(gateway_key: GatewayKeyView, model: str | None) -> None:
    allowed = gateway_key.allowed_models
    if allowed is None or model is None:
        return
    if any(model == pattern or fnmatch.fnmatchcase(model, pattern) for pattern in allowed):
        return
    raise _Refusal(403, f"this API key may not use the model {model!r}")


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None
