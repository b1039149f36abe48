"""Upstream attempts of one request: failover across the pool, then the streamed relay to the client.

:func:`run_attempts` tries the request on the provider key chosen at admission and, while the answer is still
retryable and nothing reached the client, on other keys of the pool picked by the balancer: connect errors,
timeouts before the first byte, 408/409/429/5xx/529, a key the provider refused (401/402/403), and an error
event arriving as the first event of a 200 stream. For streams the client's response head is held until the
first upstream event (bounded by ``first_event_hold``), so such a stream can still be retried. Retries wait with
full jitter, stop at the gateway key's ``retry_count``, the request's total deadline and the provider's retry
budget, and never reuse a key in one request while another is available. Every attempt feeds the balancer's
key health and is appended to the record's attempt log.

Error handling: when the attempts are exhausted the last answer is relayed as the provider gave it (an error
status with its body), or, if no answer came at all, a 502/504 in the client's dialect. Once a byte reached the
client nothing is retried: a failure then ends the stream with one in-band error event and a truncated body.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
import trio

from trioproxy.balancer import AttemptResult, Balancer, backoff_delay, is_retryable
from trioproxy.dialects import error_body, stream_error_event
from trioproxy.errors import (
    ClientGoneError,
    PoolClosedError,
    TrioProxyError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from trioproxy.exchange import ResponseSink
from trioproxy.first_event import FirstEventProbe
from trioproxy.headers import filter_response_headers, redact
from trioproxy.openai_stream import UsageChunkStripper
from trioproxy.pool import ConnectionPool, ExchangeTimeouts, UpstreamRequest, UpstreamResponse
from trioproxy.records import Outcome, RequestRecord
from trioproxy.snapshot import GatewayKeyView, ProviderKeyView, ProviderKind, ProviderView, Snapshot
from trioproxy.usage import StreamFormat, UsageMeter

logger = logging.getLogger(__name__)

JSON_HEADERS = (b"content-type", b"application/json")
# Bytes of a discarded (retried) error body kept for the balancer: Gemini puts its RetryInfo in the body.
ERROR_PREFIX_BYTES = 16 * 1024


@dataclass(slots=True)
class AttemptContext:
    """Everything the attempts of one request share; owned by the forwarder's request."""

    record: RequestRecord
    kind: ProviderKind
    fmt: StreamFormat
    started: float  # trio.current_time() when the request arrived
    snapshot: Snapshot
    provider: ProviderView
    gateway_key: GatewayKeyView
    build_request: Callable[[ProviderKeyView], UpstreamRequest]
    strip_usage: bool
    extra_headers: Sequence[tuple[bytes, bytes]] = ()  # e.g. the gateway key's own x-ratelimit-* headers
    # Runs once the provider keeps us waiting (the server then watches the client for a hang-up).
    on_slow: Callable[[], None] | None = None
    meter: UsageMeter | None = None
    bytes_to_client: int = 0
    log: list[dict[str, object]] = field(default_factory=list)


@dataclass(slots=True)
class Relay:
    """The attempt loop's collaborators; one per process."""

    pool: ConnectionPool
    balancer: Balancer
    first_event_hold: float
    rng: random.Random

    async def run_attempts(
        self,
        ctx: AttemptContext,
        response: ResponseSink,
        first_key: ProviderKeyView,
        key_admissible: Callable[[int], bool] | None,
    ) -> None:
        provider, gateway_key = ctx.provider, ctx.gateway_key
        timeouts = ExchangeTimeouts(
            connect=provider.connect_timeout,
            first_byte=gateway_key.first_byte_timeout or provider.first_byte_timeout,
            idle=provider.idle_timeout,
        )
        max_attempts = 1 + max(0, gateway_key.retry_count)
        tried: set[int] = set()

        def next_key() -> ProviderKeyView | None:
            """The key for one more attempt, or None when this was the last one (count, budget, pool, client)."""
            if len(tried) >= max_attempts or response.started:
                return None
            now = trio.current_time()
            pick = self.balancer.pick(
                gateway_key, ctx.snapshot, now=now, exclude=frozenset(tried), key_admissible=key_admissible
            )
            if pick is None:
                return None
            if not self.balancer.retry_allowed(provider.id, now=now):
                logger.warning(
                    "request %s: retry budget of provider %s spent", ctx.record.request_id, provider.id
                )
                return None
            ctx.record.panic = ctx.record.panic or pick.panic
            return pick.key

        key: ProviderKeyView | None = first_key
        failure: TrioProxyError | None = None
        with trio.move_on_after(gateway_key.total_timeout or provider.total_timeout) as deadline:
            while key is not None:
                retry = bool(tried)
                if retry:
                    if ctx.on_slow is not None:
                        ctx.on_slow()  # a client that leaves during the backoff must stop the retries
                    await trio.sleep(backoff_delay(len(tried), self.rng, self.balancer.retry_policy))
                tried.add(key.id)
                failure = None
                try:
                    key = await self._attempt(ctx, response, key, timeouts, retry=retry, next_key=next_key)
                except (UpstreamConnectError, UpstreamTimeoutError) as exc:
                    # No byte of this attempt reached the client: the pool raises these before a response.
                    failure = exc
                    key = next_key()
        if deadline.cancelled_caught:
            failure = TrioProxyError("the request exceeded its total deadline", status_hint=504)
            self._note(ctx, None, None, "total deadline exceeded")
        if failure is not None:
            await self._failed(ctx, response, failure)

    async def _attempt(
        self,
        ctx: AttemptContext,
        response: ResponseSink,
        key: ProviderKeyView,
        timeouts: ExchangeTimeouts,
        *,
        retry: bool,
        next_key: Callable[[], ProviderKeyView | None],
    ) -> ProviderKeyView | None:
        """One attempt on ``key``; returns the key to retry on, or None when the request is finished."""
        record, balancer = ctx.record, self.balancer
        record.provider_key_id = key.id
        record.attempts += 1
        attempt_start = trio.current_time()
        balancer.attempt_started(key.id, now=attempt_start, retry=retry)
        reported = False

        def report(result: AttemptResult, status: int | None, error: str | None) -> None:
            nonlocal reported
            balancer.attempt_finished(key.id, result, now=trio.current_time())
            reported = True
            self._note(ctx, key, status, error, attempt_start)

        try:
            async with self.pool.exchange(
                ctx.provider.origin, ctx.build_request(key), timeouts, ctx.on_slow
            ) as upstream:
                record.ttfb_ms = (trio.current_time() - ctx.started) * 1000.0
                status = upstream.status
                if status >= 400:
                    result = AttemptResult.status(status, upstream.headers)
                    if is_retryable(result, committed=False, policy=balancer.retry_policy):
                        # Read Gemini's RetryInfo before deciding, so the key's cooldown is right either way.
                        prefix = await _read_prefix(upstream, ERROR_PREFIX_BYTES)
                        report(AttemptResult.status(status, upstream.headers, prefix), status, None)
                        following = next_key()
                        if following is not None:
                            return following
                        record.status = status
                        record.outcome = Outcome.UPSTREAM_ERROR
                        record.error = f"provider answered {status}"
                        await self._relay(ctx, response, upstream, StreamFormat.JSON, prefix)
                        return None
                    report(result, status, None)
                    record.status = status
                    record.outcome = Outcome.UPSTREAM_ERROR
                    record.error = f"provider answered {status}"
                    await self._relay(ctx, response, upstream, StreamFormat.JSON, b"")
                    return None
                held = b""
                if ctx.fmt is StreamFormat.SSE:
                    held, is_error = await self._hold_first_event(ctx.kind, upstream)
                    if is_error:
                        report(
                            AttemptResult.stream_error_first_event(), status, "error event as the first event"
                        )
                        following = next_key()
                        if following is not None:
                            return following
                        # No other key: the client gets the provider's in-band error, recorded as such.
                        record.outcome = Outcome.UPSTREAM_ERROR
                        record.error = "the provider's stream began with an error event"
                    else:
                        report(AttemptResult.ok(trio.current_time() - attempt_start), status, None)
                else:
                    report(AttemptResult.ok(trio.current_time() - attempt_start), status, None)
                record.status = status
                await self._relay(ctx, response, upstream, ctx.fmt, held)
                return None
        except UpstreamConnectError as exc:
            report(AttemptResult.connect_error(exc.message), None, exc.message)
            raise
        except UpstreamTimeoutError as exc:
            if not reported:
                report(AttemptResult.timeout(exc.message), None, exc.message)
            if response.started:
                await self._failed(ctx, response, exc)
                return None
            raise
        except ClientGoneError:
            raise
        except PoolClosedError as exc:
            await self._failed(ctx, response, exc)
            return None
        except TrioProxyError as exc:  # the upstream died or broke the protocol after its response head
            if not reported:
                report(AttemptResult.connect_error(exc.message), None, exc.message)
            if not response.started:
                following = next_key()
                if following is not None:
                    return following
            await self._failed(ctx, response, exc)
            return None
        finally:
            if not reported:  # cancelled (client gone, deadline): the key did nothing wrong
                balancer.attempt_finished(key.id, AttemptResult.client_cancelled(), now=trio.current_time())

    async def _hold_first_event(self, kind: ProviderKind, upstream: UpstreamResponse) -> tuple[bytes, bool]:
        """Read until the first complete data event (bounded by ``first_event_hold``); is it an error?"""
        probe = FirstEventProbe(kind)
        held = bytearray()
        with trio.move_on_after(self.first_event_hold):
            while probe.verdict is None:
                data = await upstream.receive_some()
                if not data:
                    break
                held += data
                probe.feed(data)
        return bytes(held), bool(probe.verdict)

    async def _relay(
        self,
        ctx: AttemptContext,
        response: ResponseSink,
        upstream: UpstreamResponse,
        fmt: StreamFormat,
        held: bytes,
    ) -> None:
        """Stream the provider's answer to the client as it arrives, metering the same bytes."""
        stripper = UsageChunkStripper() if ctx.strip_usage and upstream.status < 400 else None
        meter = ctx.meter = UsageMeter(ctx.kind, fmt, framed_elsewhere=stripper is not None)
        headers = filter_response_headers(upstream.headers)
        headers.append((b"x-request-id", ctx.record.request_id.encode()))
        headers.extend(ctx.extra_headers)
        if ctx.record.panic:
            headers.append((b"x-trioproxy-panic", b"1"))
        content_length = None if stripper is not None or held else _content_length(upstream.headers)
        await response.start(upstream.status, headers, content_length=content_length)
        data = held
        while True:
            if data:
                if stripper is not None:
                    out, events = stripper.feed(data)
                    meter.feed_events(events)
                else:
                    meter.feed(data)
                    out = data
                if out:
                    ctx.bytes_to_client += len(out)
                    await response.send(out)
            data = await upstream.receive_some()
            if not data:
                break
        if stripper is not None:
            tail, events = stripper.flush()
            meter.feed_events(events)
            if tail:
                await response.send(tail)
        await response.end()

    async def _failed(self, ctx: AttemptContext, response: ResponseSink, failure: TrioProxyError) -> None:
        record = ctx.record
        record.outcome = Outcome.UPSTREAM_DIED
        record.error = redact(failure.message)
        logger.warning("request %s: upstream failed: %s", record.request_id, record.error)
        if not response.started:
            record.status = failure.status_hint
            await send_error(
                response, ctx.kind, record, failure.status_hint, f"upstream error: {record.error}"
            )
            return
        # The answer already started: end it with one in-band error and a truncated body.
        if ctx.fmt is not StreamFormat.JSON and record.status < 400:
            event = stream_error_event(
                ctx.kind,
                ctx.fmt,
                f"upstream error: {record.error}",
                status=failure.status_hint,
                first_element=ctx.bytes_to_client == 0,
            )
            try:
                await response.send(event)
            except ClientGoneError:
                record.outcome = Outcome.CLIENT_CANCELLED
        await response.abort()

    def _note(
        self,
        ctx: AttemptContext,
        key: ProviderKeyView | None,
        status: int | None,
        error: str | None,
        started: float | None = None,
    ) -> None:
        entry: dict[str, object] = {"key": None if key is None else key.id, "status": status, "error": error}
        if started is not None:
            entry["ms"] = round((trio.current_time() - started) * 1000.0, 3)
        ctx.log.append(entry)
        ctx.record.attempt_log = orjson.dumps(ctx.log).decode()


async def send_error(
    response: ResponseSink,
    kind: ProviderKind,
    record: RequestRecord,
    status: int,
    message: str,
    *,
    code: str | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with an error in the client's dialect (or abort if a byte of another answer already went out)."""
    record.status = status
    if response.started:
        await response.abort()
        return
    body = error_body(kind, status, message, code=code)
    headers = [JSON_HEADERS, (b"x-request-id", record.request_id.encode()), *extra_headers]
    try:
        await response.start(status, headers, content_length=len(body))
        await response.send(body)
        await response.end()
    except ClientGoneError:
        record.outcome = Outcome.CLIENT_CANCELLED


async def _read_prefix(upstream: UpstreamResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of a body we are about to discard (the connection is closed, not drained)."""
    prefix = bytearray()
    while len(prefix) < limit:
        data = await upstream.receive_some()
        if not data:
            break
        prefix += data
    return bytes(prefix[:limit])


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None
