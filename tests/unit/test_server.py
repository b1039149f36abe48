"""ProxyServer over real sockets on 127.0.0.1 (and in-memory streams for the timers), with an echo handler."""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trio.testing

from trioproxy.errors import ClientGoneError
from trioproxy.exchange import ClientRequest, ResponseSink
from trioproxy.request_guard import RequestHead
from trioproxy.server import ProxyServer
from trioproxy.settings import ServerLimits

LIMITS = ServerLimits(max_body_bytes=1000)
CANARY = b"GET /canary HTTP/1.1\r\nHost: t\r\n\r\n"
SECRET = "sk-" + "secret-in-message"


# -- the application under the server ------------------------------------------------------------------------


@dataclass
class App:
    """An echo handler with a few scripted paths, and a recording rejector."""

    seen: list[ClientRequest] = field(default_factory=list)
    rejected: list[tuple[int, str, RequestHead | None]] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    entered: trio.Event = field(default_factory=trio.Event)
    cancelled: trio.Event = field(default_factory=trio.Event)
    send_errors: list[tuple[type[Exception], float]] = field(default_factory=list)
    slow_seconds: float = 0.3

    async def __call__(self, request: ClientRequest, response: ResponseSink) -> None:
        self.seen.append(request)
        self.starts.append(trio.current_time())
        try:
            await self._route(request, response)
        finally:
            self.ends.append(trio.current_time())

    async def _route(self, request: ClientRequest, response: ResponseSink) -> None:
        path = request.path
        if path == "/hang":
            request.watch_disconnect()  # a handler asks before a long wait (the forwarder: after SLOW_WAIT)
            request.watch_disconnect()  # idempotent
            self.entered.set()
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.set()
        if path == "/slow":
            request.watch_disconnect()
            self.entered.set()
            await trio.sleep(self.slow_seconds)
        if path == "/stream":
            await response.start(200, [(b"content-type", b"text/event-stream")], content_length=None)
            for piece in (b"a", b"b", b"c"):
                await response.send(piece)
            await response.end()
            return
        if path == "/abort":
            await response.start(200, [(b"content-type", b"text/event-stream")], content_length=None)
            await response.send(b"partial")
            await response.abort()
            return
        if path == "/boom":
            raise ValueError(SECRET)
        if path == "/boom-late":
            await response.start(200, [], content_length=None)
            await response.send(b"x")
            raise ValueError(SECRET)
        if path == "/silent":
            return
        if path == "/big":
            await response.start(200, [], content_length=None)
            try:
                while True:
                    await response.send(b"x" * 65536)
            except ClientGoneError as exc:
                self.send_errors.append((type(exc), trio.current_time()))
                raise
        if path == "/restart":
            await response.start(200, [(b"x-first", b"1")], content_length=None)
            await response.start(502, [(b"content-length", b"999")], content_length=2)
            await response.send(b"no")
            await response.end()
            return
        body = json.dumps(
            {
                "method": request.method,
                "path": path,
                "query": request.query,
                "body": request.body.decode("latin-1"),
            }
        ).encode()
        await response.start(200, [(b"content-type", b"application/json")], content_length=len(body))
        await response.send(body)
        await response.end()

    def reject(
        self, status: int, message: str, head: RequestHead | None, peer_ip: str
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        self.rejected.append((status, message, head))
        body = json.dumps({"error": {"status": status, "message": message}}).encode()
        return [(b"content-type", b"application/json")], body

    @property
    def paths(self) -> list[str]:
        return [request.path for request in self.seen]


# -- the client side -----------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    informational: list[int]

    @property
    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Peer:
    """A raw client: sends bytes as given, parses the answers with an h11 client."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._client = h11.Connection(h11.CLIENT)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, within: float = 5.0) -> Reply:
        client = self._client
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        client.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
        client.send(h11.EndOfMessage())
        informational: list[int] = []
        response: h11.Response | None = None
        body = bytearray()
        with trio.fail_after(within):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await self.stream.receive_some()
                    except trio.BrokenResourceError:
                        data = b""
                    client.receive_data(bytes(data))
                elif isinstance(event, h11.InformationalResponse):
                    informational.append(event.status_code)
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(f"unexpected event {event!r}")
        assert response is not None
        return Reply(response.status_code, dict(response.headers), bytes(body), informational)

    async def closed(self, within: float = 2.0) -> bool:
        """Whether the server closes the connection (EOF or reset) without sending anything more."""
        pending, eof = self._client.trailing_data
        if pending:
            return False
        if eof:
            return True
        with trio.move_on_after(within):
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                return True
            return not data
        return False


@dataclass
class Harness:
    server: ProxyServer
    port: int
    peers: list[Peer] = field(default_factory=list)

    async def connect(self) -> Peer:
        peer = Peer(await trio.open_tcp_stream("127.0.0.1", self.port))
        self.peers.append(peer)
        return peer


@asynccontextmanager
async def serving(app: App, limits: ServerLimits = LIMITS, *, cancel: bool = True) -> AsyncIterator[Harness]:
    """The server on 127.0.0.1; on exit the clients close and the server is cancelled (or, with
    ``cancel=False``, must end by itself: drained)."""
    server = ProxyServer(limits, app, app.reject)
    async with trio.open_nursery() as nursery:
        harness = Harness(server, await nursery.start(server.serve, "127.0.0.1", 0))
        try:
            yield harness
        finally:
            for peer in harness.peers:
                await peer.stream.aclose()
        if cancel:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def in_memory(
    app: App, limits: ServerLimits = LIMITS, *, lockstep: bool = False
) -> AsyncIterator[tuple[ProxyServer, Peer]]:
    """The server on one end of an in-memory stream (for virtual-time tests), a Peer on the other."""
    server = ProxyServer(limits, app, app.reject)
    client, server_side = (
        trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side, "127.0.0.1", 40000)
        yield server, Peer(client)
        nursery.cancel_scope.cancel()


def get(path: str, *extra: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: t\r\n".encode() + b"".join(line + b"\r\n" for line in extra) + b"\r\n"
    )


def head_of_size(size: int) -> bytes:
    start = b"GET /sized HTTP/1.1\r\nHost: t\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


# -- basics --------------------------------------------------------------------------------------------------


async def test_echo_and_keep_alive_reuse() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(b"POST /a?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        first = await peer.reply()
        assert first.status == 200
        assert first.json == {"method": "POST", "path": "/a", "query": "x=1", "body": "abc"}
        assert b"connection" not in first.headers
        await peer.send(get("/b"))
        second = await peer.reply()
        assert second.json["path"] == "/b"
        assert app.paths == ["/a", "/b"]
        assert app.seen[0].peer_ip == "127.0.0.1"
        assert app.seen[0].headers[0] == (b"host", b"t")
        assert app.seen[0].peer_port == app.seen[1].peer_port  # one connection


async def test_pipelined_requests_are_answered_in_order() -> None:
    app = App(slow_seconds=0.05)
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(
            get("/slow") + b"POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi" + get("/three")
        )
        replies = [await peer.reply() for _ in range(3)]
        assert [reply.json["path"] for reply in replies] == ["/slow", "/two", "/three"]
        assert replies[1].json["body"] == "hi"
        # never interleaved: each handler started after the previous one ended
        for end, next_start in zip(app.ends, app.starts[1:], strict=False):
            assert next_start >= end


async def test_request_pipelined_while_the_handler_runs_waits_its_turn() -> None:
    app = App(slow_seconds=0.2)
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/slow"))
        await app.entered.wait()
        await peer.send(get("/after"))
        assert (await peer.reply()).json["path"] == "/slow"
        assert (await peer.reply()).json["path"] == "/after"
        assert app.starts[1] >= app.ends[0]


async def test_streaming_response_is_chunked() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/stream"))
        reply = await peer.reply()
        assert reply.headers[b"transfer-encoding"] == b"chunked"
        assert reply.body == b"abc"


async def test_http_10_client_gets_a_close_delimited_body_and_a_close() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(b"GET /stream HTTP/1.0\r\n\r\n" + CANARY)
        reply = await peer.reply()
        assert reply.body == b"abc"
        assert b"transfer-encoding" not in reply.headers
        assert await peer.closed()
        assert app.paths == ["/stream"]


async def test_connection_close_is_honoured() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/a", b"Connection: close") + CANARY)
        reply = await peer.reply()
        assert reply.headers[b"connection"] == b"close"
        assert await peer.closed()
        assert app.paths == ["/a"]


async def test_max_requests_per_connection() -> None:
    app = App()
    async with serving(app, ServerLimits(max_requests_per_connection=2)) as h:
        peer = await h.connect()
        await peer.send(get("/1") + get("/2") + CANARY)
        assert b"connection" not in (await peer.reply()).headers
        assert (await peer.reply()).headers[b"connection"] == b"close"
        assert await peer.closed()
        assert app.paths == ["/1", "/2"]


async def test_expect_100_continue_within_limits() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        with trio.fail_after(5):
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += await peer.stream.receive_some()
        assert seen.startswith(b"HTTP/1.1 100 ")
        await peer.send(b"hello")
        with trio.fail_after(5):
            while b"hello" not in seen:
                seen += await peer.stream.receive_some()
        assert b"HTTP/1.1 200 " in seen
        assert app.seen[0].body == b"hello"


async def test_head_request_gets_headers_only_and_keeps_the_connection() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n" + get("/after"))
        with trio.fail_after(5):
            seen = b""
            while b"/after" not in seen:
                seen += await peer.stream.receive_some()
        first, _, rest = seen.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ")
        assert rest.startswith(b"HTTP/1.1 200 ")  # no body bytes between the two answers
        assert app.paths == ["/stream", "/after"]


async def test_sink_head_can_be_replaced_until_the_first_byte() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/restart"))
        reply = await peer.reply()
        assert reply.status == 502
        assert reply.body == b"no"
        assert b"x-first" not in reply.headers
        assert reply.headers[b"content-length"] == b"2"


# -- limits at their boundaries ------------------------------------------------------------------------------


async def expect_rejection(h: Harness, data: bytes, status: int | None) -> Reply:
    """Send ``data`` then a valid request; the answer is one 4xx/5xx with connection: close, then EOF."""
    peer = await h.connect()
    await peer.send(data + CANARY)
    reply = await peer.reply()
    if status is None:
        assert 400 <= reply.status < 600
    else:
        assert reply.status == status
    assert reply.headers[b"connection"] == b"close"
    assert reply.headers[b"content-type"] == b"application/json"
    assert json.loads(reply.body)["error"]["status"] == reply.status
    assert await peer.closed()
    return reply


async def test_header_block_boundary() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(head_of_size(16384))
        assert (await peer.reply()).status == 200
        await expect_rejection(h, head_of_size(16385), 431)
        assert app.paths == ["/sized"]


async def test_header_count_boundary() -> None:
    def with_headers(count: int) -> bytes:
        return get("/counted", *[b"X-H%d: v" % i for i in range(count - 1)])

    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(with_headers(100))
        assert (await peer.reply()).status == 200
        await expect_rejection(h, with_headers(101), 431)
        assert app.paths == ["/counted"]


async def test_target_length_boundary() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/" + "a" * 8191))
        assert (await peer.reply()).status == 200
        await expect_rejection(h, get("/" + "b" * 8192), 414)
        assert len(app.seen) == 1


async def test_body_limit_by_content_length_without_100_continue() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
        assert (await peer.reply()).status == 200
        head = b"POST /big HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n"
        peer = await h.connect()
        await peer.send(head)  # the body is never sent: the answer must come without it
        reply = await peer.reply()
        assert reply.status == 413
        assert reply.informational == []
        assert await peer.closed()
        assert app.paths == ["/ok"]


async def test_body_limit_for_chunked_bodies_as_soon_as_crossed() -> None:
    app = App()
    head = b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(head + b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n")
        assert (await peer.reply()).status == 200
        peer = await h.connect()
        # 1001 bytes and no terminal chunk: the 413 must not wait for the end of the body
        await peer.send(head + b"258\r\n" + b"x" * 600 + b"\r\n191\r\n" + b"x" * 401 + b"\r\n")
        reply = await peer.reply()
        assert reply.status == 413
        assert await peer.closed()
        assert app.paths == ["/chunked"]


# -- malformed and smuggling requests ------------------------------------------------------------------------

CHUNKED_POST = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

SMUGGLING = {
    "cl_and_te": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        400,
    ),
    "te_chunked_gzip": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te_xchunked": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    "te_identity": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nX",
        400,
    ),
    "te_twice": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
        400,
    ),
    "te_obs_fold": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    "te_space_before_colon": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te_underscore": (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "cl_plus": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello", 400),
    "cl_list_conflict": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello", 400),
    "cl_two_headers": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        400,
    ),
    "cl_hex": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello", 400),
    "cl_21_digits": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n", None),
    "chunk_size_0x": (CHUNKED_POST + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_negative": (CHUNKED_POST + b"-1\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_21_hex": (CHUNKED_POST + b"1" * 21 + b"\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_bad_footer": (CHUNKED_POST + b"5\r\nhelloXX0\r\n\r\n", 400),
    "missing_host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "duplicate_host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "nul_in_value": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n", 400),
    "nul_first": (b"\x00", 400),
    "tls_client_hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: t\n\n", 400),
    "bare_cr": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n", 400),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n", 400),
    "underscore_header": (b"GET / HTTP/1.1\r\nHost: t\r\nX_Api_Key: k\r\n\r\n", 400),
    "absolute_form": (b"GET http://169.254.169.254/x HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "asterisk_form": (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "authority_form": (b"GET a:443 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "connect": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    "upgrade": (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 400),
    "http2": (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    "http09": (b"GET /\r\n\r\n", 400),
    "double_space": (b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "no_colon": (b"GET / HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n", 400),
    "non_ascii_target": (b"GET /\xff HTTP/1.1\r\nHost: t\r\n\r\n", 400),
}


@pytest.mark.parametrize(("data", "status"), list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_malformed_request_is_rejected_and_the_pipelined_one_never_runs(
    data: bytes, status: int | None
) -> None:
    app = App()
    async with serving(app) as h:
        await expect_rejection(h, data, status)
    assert app.seen == []
    assert len(app.rejected) == 1


async def test_rejection_messages_do_not_quote_the_request() -> None:
    app = App()
    async with serving(app) as h:
        reply = await expect_rejection(
            h, b"GET / HTTP/1.1\r\nHost: t\r\nAuthorization: " + SECRET.encode() + b"\x00\r\n\r\n", 400
        )
        assert SECRET.encode() not in reply.body
        assert SECRET not in app.rejected[0][1]
        assert app.rejected[0][1] == "control character in a header value"


# -- handler failures ----------------------------------------------------------------------------------------


async def test_handler_exception_before_the_answer_is_a_500(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    with caplog.at_level(logging.ERROR, logger="trioproxy.server"):
        async with serving(app) as h:
            reply = await expect_rejection(h, get("/boom"), 500)
    assert reply.json["error"] == {"status": 500, "message": "internal error"}
    assert app.paths == ["/boom"]
    assert "ValueError" in caplog.text
    assert SECRET not in caplog.text


async def test_handler_returning_without_an_answer_is_a_500() -> None:
    app = App()
    async with serving(app) as h:
        await expect_rejection(h, get("/silent"), 500)


async def test_handler_exception_after_the_first_byte_aborts() -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/boom-late") + CANARY)
        with pytest.raises(h11.RemoteProtocolError):
            await peer.reply()
        assert app.paths == ["/boom-late"]


async def read_all_events(client: h11.Connection, stream: trio.abc.Stream, events: list[h11.Event]) -> None:
    with trio.fail_after(5):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Event):
                assert not isinstance(event, h11.EndOfMessage)
                events.append(event)
            else:
                raise AssertionError("paused")


async def test_abort_truncates_the_chunked_body() -> None:
    app = App()
    async with serving(app) as h:
        stream = (await h.connect()).stream
        client = h11.Connection(h11.CLIENT)
        await stream.send_all(
            client.send(h11.Request(method="GET", target="/abort", headers=[("host", "t")]))
        )
        await stream.send_all(client.send(h11.EndOfMessage()))
        events: list[h11.Event] = []
        with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
            await read_all_events(client, stream, events)
        assert isinstance(events[0], h11.Response)
        assert events[0].status_code == 200
        assert [event.data for event in events[1:] if isinstance(event, h11.Data)] == [b"partial"]


# -- client disconnects --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_client_disconnect_cancels_the_handler(reset: bool) -> None:
    app = App()
    async with serving(app) as h:
        peer = await h.connect()
        await peer.send(get("/hang"))
        await app.entered.wait()
        assert h.server.active_requests == 1
        if reset:
            assert isinstance(peer.stream, trio.SocketStream)
            peer.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        left_at = trio.current_time()
        await peer.stream.aclose()
        with trio.fail_after(1):
            await app.cancelled.wait()
        assert trio.current_time() - left_at < 0.5
        assert app.seen[0].disconnected.is_set()
        with trio.fail_after(1):
            while h.server.active_requests or h.server.open_connections:
                await trio.sleep(0.01)


# -- connection cap and drain --------------------------------------------------------------------------------


async def test_connection_cap_closes_the_next_connection_at_once() -> None:
    app = App()
    async with serving(app, ServerLimits(max_connections=2)) as h:
        first, second = await h.connect(), await h.connect()
        for peer in (first, second):
            await peer.send(get("/held"))
            assert (await peer.reply()).status == 200
        third = await h.connect()
        assert await third.closed()
        await first.send(get("/still-served"))
        assert (await first.reply()).status == 200
        await second.stream.aclose()
        with trio.fail_after(2):
            while h.server.open_connections > 1:
                await trio.sleep(0.01)
        fourth = await h.connect()
        await fourth.send(get("/fourth"))
        assert (await fourth.reply()).status == 200
        assert app.paths == ["/held", "/held", "/still-served", "/fourth"]


async def test_drain_finishes_in_flight_closes_idle_and_refuses_new() -> None:
    app = App(slow_seconds=0.3)
    drained_at: list[float] = []
    async with serving(app, cancel=False) as h:
        idle = await h.connect()
        await idle.send(get("/warm"))
        assert (await idle.reply()).status == 200
        busy = await h.connect()
        await busy.send(get("/slow"))
        await app.entered.wait()
        assert h.server.active_requests == 1

        async def drain() -> None:
            await h.server.drain(trio.current_time() + 5)
            drained_at.append(trio.current_time())

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            assert await idle.closed(within=0.2)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", h.port)
            reply = await busy.reply()
            assert reply.status == 200
            assert reply.headers[b"connection"] == b"close"
            assert await busy.closed()
        assert drained_at
        assert drained_at[0] - started < 1
        assert h.server.active_requests == 0
        assert h.server.open_connections == 0
    # leaving serving(cancel=False) means serve() returned by itself after the drain
    assert app.paths == ["/warm", "/slow"]


async def test_drain_cancels_what_is_left_at_the_deadline() -> None:
    app = App()
    async with serving(app, cancel=False) as h:
        peer = await h.connect()
        await peer.send(get("/hang"))
        await app.entered.wait()
        started = trio.current_time()
        await h.server.drain(started + 0.2)
        assert 0.2 <= trio.current_time() - started < 1
        assert app.cancelled.is_set()
        assert await peer.closed()


# -- timers, in virtual time ------------------------------------------------------------------------------


async def test_header_timeout_from_the_first_byte(autojump_clock: trio.testing.MockClock) -> None:
    app = App()
    async with in_memory(app) as (_, peer):
        await trio.sleep(3)  # idle before the first byte does not count
        first_byte = trio.current_time()
        await peer.send(b"GET / HTTP/1.1\r\n")
        for _ in range(9):  # slowloris: one header byte per second
            await trio.sleep(1)
            await peer.send(b"X")
        reply = await peer.reply(within=100)
        assert reply.status == 408
        assert trio.current_time() - first_byte == pytest.approx(LIMITS.header_timeout)
        assert await peer.closed()
    assert app.rejected[0][0] == 408
    assert app.seen == []


async def test_new_connection_without_bytes_closes_silently(autojump_clock: trio.testing.MockClock) -> None:
    app = App()
    async with in_memory(app) as (_, peer):
        assert await peer.closed(within=100)
        assert trio.current_time() == pytest.approx(LIMITS.header_timeout)
    assert app.rejected == []


async def test_idle_keep_alive_connection_closes_silently(autojump_clock: trio.testing.MockClock) -> None:
    app = App()
    async with in_memory(app) as (_, peer):
        await peer.send(get("/a"))
        assert (await peer.reply()).status == 200
        answered = trio.current_time()
        assert await peer.closed(within=1000)
        assert trio.current_time() - answered == pytest.approx(LIMITS.keepalive_timeout)
    assert app.rejected == []


async def test_keep_alive_connection_used_before_the_timeout_stays_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = App()
    async with in_memory(app) as (_, peer):
        for index in range(3):
            await peer.send(get(f"/{index}"))
            assert (await peer.reply()).status == 200
            await trio.sleep(LIMITS.keepalive_timeout - 1)
        await peer.send(get("/last"))
        assert (await peer.reply()).status == 200
    assert app.paths == ["/0", "/1", "/2", "/last"]


async def test_body_read_stall_is_a_408(autojump_clock: trio.testing.MockClock) -> None:
    app = App()
    async with in_memory(app) as (_, peer):
        await peer.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        await trio.sleep(LIMITS.body_read_timeout - 1)
        last_byte = trio.current_time()
        await peer.send(b"w")  # progress resets the timer
        reply = await peer.reply(within=1000)
        assert reply.status == 408
        assert trio.current_time() - last_byte == pytest.approx(LIMITS.body_read_timeout)
    assert app.seen == []


async def test_client_that_stops_reading_gets_client_gone(autojump_clock: trio.testing.MockClock) -> None:
    app = App()
    async with in_memory(app, lockstep=True) as (_, peer):
        await peer.send(get("/big"))
        started = trio.current_time()
        await trio.sleep(1000)  # never read
        assert len(app.send_errors) == 1
        error, when = app.send_errors[0]
        assert error is ClientGoneError
        assert when - started == pytest.approx(LIMITS.send_timeout)
