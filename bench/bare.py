"""``python -m bench.bare``: trioproxy's forwarder with the gateway taken out, the bench's "bare" lane.

Same design and the same code as ``trioproxy serve`` for everything that moves bytes: the
:class:`~trioproxy.server.ProxyServer` (strict head parsing, limits, keep-alive, disconnect watcher), the
:class:`~trioproxy.pool.ConnectionPool` (keep-alive upstream connections), the sans-IO framing and the
streamed relay through a :class:`~trioproxy.exchange.ResponseSink`. What it leaves out is exactly what issue 6
asks to price: no gateway-key authentication, no route table, no balancer or key health, no limits, no usage
metering, no request records, no metrics. The client's key picks one upstream (a dict lookup), and one
fixed provider key is sent there.

The bench compares ``trioproxy-1`` with this lane at equal concurrency: ``1 - rps(trioproxy) / rps(bare)`` is
what metering, auth and balancing cost together (target: at most 20%).

    python -m bench.bare --port 8081 --route sk-client=http://127.0.0.1:18000 --key sk-upstream
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from trioproxy.exchange import ClientRequest, Headers, ResponseSink
from trioproxy.headers import filter_response_headers
from trioproxy.pool import ConnectionPool, ExchangeTimeouts, UpstreamRequest
from trioproxy.request_guard import RequestHead
from trioproxy.server import ProxyServer
from trioproxy.settings import ServerLimits
from trioproxy.snapshot import Origin

# Request headers a forwarder must not pass on (hop-by-hop, framing, and the client's credentials).
_DROPPED = frozenset(
    {b"host", b"authorization", b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"te"}
)
_TIMEOUTS = ExchangeTimeouts(connect=10.0, first_byte=300.0, idle=300.0)


@dataclass(frozen=True, slots=True)
class Upstream:
    origin: Origin
    prefix: bytes  # the base URL's path, put before the client's target


def parse_route(text: str) -> tuple[bytes, Upstream]:
    """``CLIENT_KEY=http://host:port/prefix`` -> the client key's authorization value and its upstream."""
    client_key, _, url = text.partition("=")
    parts = urlsplit(url)
    if not client_key or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not CLIENT_KEY=URL: {text!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    upstream = Upstream(Origin(parts.scheme, parts.hostname, port), parts.path.rstrip("/").encode())
    return f"Bearer {client_key}".encode(), upstream


class BareForwarder:
    """Forward each request to the upstream its client key names, with one fixed provider key; relay the
    answer as it arrives. The key lookup is one dict access: the bare minimum of routing."""

    def __init__(self, pool: ConnectionPool, routes: dict[bytes, Upstream], provider_key: str) -> None:
        self._pool = pool
        self._routes = routes
        self._auth = (b"authorization", f"Bearer {provider_key}".encode())

    async def __call__(self, request: ClientRequest, response: ResponseSink) -> None:
        client_auth = next((value for name, value in request.headers if name == b"authorization"), b"")
        upstream = self._routes.get(client_auth)
        if upstream is None:
            body = b'{"error":"unknown key"}'
            await response.start(401, [(b"content-type", b"application/json")], content_length=len(body))
            await response.send(body)
            await response.end()
            return
        headers = [(b"host", upstream.origin.host_header.encode()), self._auth]
        headers += [(name, value) for name, value in request.headers if name not in _DROPPED]
        headers.append((b"content-length", b"%d" % len(request.body)))
        target = upstream.prefix + request.target.encode()
        upstream_request = UpstreamRequest(request.method.encode(), target, headers, request.body)
        async with self._pool.exchange(
            upstream.origin, upstream_request, _TIMEOUTS, request.watch_disconnect
        ) as answer:
            length = next((int(v) for n, v in answer.headers if n == b"content-length"), None)
            await response.start(
                answer.status, filter_response_headers(answer.headers), content_length=length
            )
            while data := await answer.receive_some():
                await response.send(data)
            await response.end()

    def reject(
        self, status: int, message: str, head: RequestHead | None, peer_ip: str
    ) -> tuple[Headers, bytes]:
        return [(b"content-type", b"text/plain")], message.encode()


async def serve(host: str, port: int, routes: dict[bytes, Upstream], provider_key: str) -> None:
    pool = ConnectionPool(
        max_connections_per_origin=1024,
        idle_expiry=60.0,
        ssl_context=ssl.create_default_context(),
        address_allowed=lambda _address: True,
    )
    forwarder = BareForwarder(pool, routes, provider_key)
    server = ProxyServer(ServerLimits(), forwarder, forwarder.reject)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await nursery.start(server.serve, host, port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--route", action="append", required=True, help="CLIENT_KEY=http://host:port[/prefix] (repeatable)"
    )
    parser.add_argument("--key", required=True, help="the provider key sent upstream")
    args = parser.parse_args(argv)
    try:
        routes = dict(parse_route(text) for text in args.route)
    except ValueError as exc:
        parser.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.host, args.port, routes, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
