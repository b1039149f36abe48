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

import dataclasses
import fnmatch
import ipaddress
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from trioproxy.balancer import Balancer
from trioproxy.dialects import error_body
from trioproxy.errors import ClientGoneError, TrioProxyError
from trioproxy.exchange import ClientRequest, Headers, ResponseSink
from trioproxy.gateway_keys import has_valid_checksum, hash_gateway_key
from trioproxy.headers import build_upstream_headers, client_address, extract_gateway_key
from trioproxy.limits import Admission, AdmissionRequest, Refused, Reservation, Scope, usage_tokens
from trioproxy.limits.estimate import estimate_cost, estimate_tokens
from trioproxy.metering import MeteringWriter
from trioproxy.metrics import Metrics
from trioproxy.openai_stream import prepare_stream_usage
from trioproxy.pool import ConnectionPool, UpstreamRequest
from trioproxy.records import Outcome, RequestRecord, Usage
from trioproxy.relay import JSON_HEADERS, AttemptContext, Relay, send_error
from trioproxy.reloader import SnapshotHolder
from trioproxy.request_guard import RequestHead
from trioproxy.routes import Route, RouteRejection, guess_dialect, match_route
from trioproxy.settings import Settings
from trioproxy.snapshot import GatewayKeyView, ProviderKeyView, ProviderKind, ProviderView, Snapshot
from trioproxy.usage import StreamFormat

logger = logging.getLogger(__name__)

# The usual rule of thumb for English text in current tokenizers; only used to estimate broken-off streams.
CHARS_PER_TOKEN = 4
# OpenAI routes whose streams report usage only when asked (stream_options.include_usage).
INCLUDE_USAGE_ROUTES = frozenset({"openai.chat_completions", "openai.completions"})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Refusal(TrioProxyError):
    """The gateway refuses the request before contacting the provider; answered in the client's dialect."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message, status_hint=status)
        self.code = code
        self.headers = tuple(headers)


@dataclass(slots=True)
class _Exchange:
    """What one request learns as it goes; read by the metering step at the end."""

    record: RequestRecord
    kind: ProviderKind
    started: float  # trio.current_time()
    snapshot: Snapshot
    route: Route | None = None
    attempts: AttemptContext | None = None
    reservation: Reservation | None = None
    body_json: dict[str, Any] | None = None


class Forwarder:
    """Serves proxied requests. One instance per process; it holds no per-request state."""

    def __init__(
        self,
        settings: Settings,
        snapshots: SnapshotHolder,
        pool: ConnectionPool,
        metering: MeteringWriter,
        balancer: Balancer,
        admission: Admission,
        *,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._snapshots = snapshots
        self._metering = metering
        self._balancer = balancer
        self._admission = admission
        self._relay = Relay(pool, balancer, settings.upstream.first_event_hold, rng or random.Random())
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
            await send_error(
                response,
                exchange.kind,
                record,
                refusal.status_hint,
                refusal.message,
                code=refusal.code,
                extra_headers=refusal.headers,
            )
        except ClientGoneError:
            record.outcome = Outcome.CLIENT_CANCELLED
        finally:
            self._finish(request, exchange)

    def _finish(self, request: ClientRequest, exchange: _Exchange) -> None:
        """Close the record (runs even while the handler is being cancelled): usage, cost, settlement, metering."""
        record = exchange.record
        record.duration_ms = (trio.current_time() - exchange.started) * 1000.0
        complete = False
        attempts = exchange.attempts
        if attempts is not None and attempts.meter is not None:
            usage = reported = attempts.meter.finish()
            complete = usage.complete
            answered = 0 < record.status < 400
            record.usage_partial = answered and not usage.complete
            if (
                record.usage_partial
                and exchange.body_json is not None
                and record.outcome is not Outcome.UPSTREAM_ERROR
            ):
                usage = _estimate_broken_off(reported, attempts.meter.generated_chars, exchange.body_json)
                record.usage_estimated = usage is not reported
            record.usage = usage
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
        if exchange.reservation is not None:
            if record.usage.reported or record.cost is not None:
                cost = record.cost.total if record.cost is not None else None
                self._admission.settle(exchange.reservation, usage_tokens(record.usage), cost)
            else:
                self._admission.release(exchange.reservation)
        if self._metrics is not None:
            self._metrics.observe(record)
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
        record = RequestRecord(
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
        if self._metrics is not None:
            self._metrics.observe(record)
        self._metering.submit(record)
        return [JSON_HEADERS, (b"x-request-id", request_id.encode())], error_body(kind, status, message)

    # -- the steps --------------------------------------------------------------------------------------------

    async def _serve(self, request: ClientRequest, response: ResponseSink, exchange: _Exchange) -> None:
        record = exchange.record
        snapshot = exchange.snapshot
        matched = match_route(request.method, request.target, request.headers)
        if isinstance(matched, RouteRejection):
            exchange.kind = matched.kind
            raise _Refusal(matched.status, matched.message)
        route = matched
        exchange.route = route
        exchange.kind = route.kind
        record.route = route.name

        gateway_key = self._authenticate(request, route, snapshot)
        provider = snapshot.providers[gateway_key.provider_id]
        record.gateway_key_id = gateway_key.id
        record.user_id = gateway_key.owner_id
        record.provider_id = provider.id
        record.provider_kind = provider.kind.value

        body_json = exchange.body_json = _parse_body(route, request.body)
        model = route.model or _str_or_none(body_json.get("model"))
        record.model = model
        fmt = _stream_format(route, body_json)
        record.stream = fmt is not StreamFormat.JSON
        _check_model_allowed(gateway_key, model)

        body = request.body if route.has_body else b""
        strip_usage = False
        if route.name in INCLUDE_USAGE_ROUTES and record.stream:
            prepared, client_asked = prepare_stream_usage(body_json)
            if not client_asked:
                body = json.dumps(prepared, separators=(",", ":"), ensure_ascii=False).encode()
                strip_usage = True

        key_admissible = self._key_admissible()
        pick = self._balancer.pick(
            gateway_key, snapshot, now=trio.current_time(), key_admissible=key_admissible
        )
        if pick is None:
            raise _Refusal(503, "no provider key of this gateway key's pool is available")
        first_key, limit_headers = await self._admit(
            exchange, gateway_key, provider, pick.key, route, body_json
        )
        record.panic = pick.panic

        def build_request(key: ProviderKeyView) -> UpstreamRequest:
            target = provider.path_prefix + route.upstream_path
            if route.upstream_query:
                target += "?" + route.upstream_query
            return UpstreamRequest(
                method=route.method.encode(),
                target=target.encode(),
                headers=build_upstream_headers(
                    route.kind,
                    request.headers,
                    secret=key.secret,
                    host=provider.origin.host_header,
                    user_agent=self._settings.upstream.user_agent,
                    extra_headers=provider.extra_headers,
                    content_length=len(body) if route.has_body else None,
                    request_id=record.request_id,
                ),
                body=body,
            )

        exchange.attempts = AttemptContext(
            record=record,
            kind=route.kind,
            fmt=fmt,
            started=exchange.started,
            snapshot=snapshot,
            provider=provider,
            gateway_key=gateway_key,
            build_request=build_request,
            strip_usage=strip_usage,
            extra_headers=limit_headers,
            on_slow=request.watch_disconnect,
        )
        await self._relay.run_attempts(exchange.attempts, response, first_key, key_admissible)

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

    def _key_admissible(self) -> Callable[[int], bool]:
        admission = self._admission
        now = time.time()
        return lambda key_id: admission.provider_key_admissible(key_id, now)

    async def _admit(
        self,
        exchange: _Exchange,
        gateway_key: GatewayKeyView,
        provider: ProviderView,
        key: ProviderKeyView,
        route: Route,
        body_json: dict[str, Any],
    ) -> tuple[ProviderKeyView, tuple[tuple[bytes, bytes], ...]]:
        """Reserve the request on its limits (gateway key, owner, provider key); returns the key to use first.

        A provider key at its own limit is swapped for another key of the pool; any other refusal ends the
        request with the limit's status, ``Retry-After`` and the gateway key's ``x-ratelimit-*`` headers.
        """
        snapshot = exchange.snapshot
        user = snapshot.users.get(gateway_key.owner_id) if gateway_key.owner_id is not None else None
        if not _has_limits(gateway_key) and user is None and not _has_key_limits(key):
            return key, ()
        estimate = estimate_tokens(
            body_json,
            generates=route.billable and route.has_body,
            default_output_tokens=self._admission.settings.default_output_tokens,
        )
        cost = estimate_cost(snapshot.prices, route.kind, exchange.record.model, estimate)
        lease = (gateway_key.total_timeout or provider.total_timeout) + 60.0
        excluded: set[int] = set()
        while True:
            verdict = await self._admission.admit(
                AdmissionRequest(
                    exchange.record.request_id,
                    gateway_key,
                    time.time(),
                    estimate.total,
                    cost,
                    exchange.record.model,
                    user,
                    key,
                    lease_seconds=lease,
                )
            )
            if not isinstance(verdict, Refused):
                exchange.reservation = verdict.reservation
                return key, verdict.headers
            if verdict.scope is Scope.PROVIDER_KEY:
                excluded.add(key.id)
                pick = self._balancer.pick(
                    gateway_key,
                    snapshot,
                    now=trio.current_time(),
                    exclude=frozenset(excluded),
                    key_admissible=self._key_admissible(),
                )
                if pick is not None:
                    key = pick.key
                    continue
            raise _Refusal(
                verdict.status_for(exchange.kind),
                verdict.message,
                code=verdict.openai_code,
                headers=verdict.headers,
            )


def _estimate_broken_off(usage: Usage, generated_chars: int, body: dict[str, Any]) -> Usage:
    """Usage of a stream that broke off before the provider reported all of it (OpenAI reports only at the
    end): the prompt estimated from the request body, the output from the generated text seen. Never less than
    what the provider did report, so a broken stream is never recorded at $0 when it produced tokens."""
    output = max(usage.output_tokens, math.ceil(generated_chars / CHARS_PER_TOKEN))
    input_tokens = usage.input_tokens
    if not usage.reported or input_tokens == 0:
        input_tokens = max(input_tokens, estimate_tokens(body, generates=False).input_tokens)
    if (input_tokens, output) == (usage.input_tokens, usage.output_tokens):
        return usage
    return dataclasses.replace(usage, input_tokens=input_tokens, output_tokens=output)


def _has_limits(key: GatewayKeyView) -> bool:
    return any(
        value is not None
        for value in (
            key.rpm_limit,
            key.tpm_limit,
            key.rpd_limit,
            key.daily_token_limit,
            key.daily_cost_limit,
            key.budget,
            key.max_concurrency,
        )
    )


def _has_key_limits(key: ProviderKeyView) -> bool:
    return key.rpm_limit is not None or key.tpm_limit is not None or key.rpd_limit is not None


def _parse_body(route: Route, body: bytes) -> dict[str, Any]:
    if not route.has_body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses a few things the standard library reads (integers beyond 64 bits, lone surrogates);
        # those bodies take the slow parser, so they are judged exactly as before.
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
