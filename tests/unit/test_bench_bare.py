"""The bench's "bare" lane (bench/bare.py) on real sockets: client key -> upstream lookup, the provider key swapped
in, 401 for unknown keys, streams relayed as they come; and its ``--route`` parser."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpcore
import pytest
import trio

from bench import bare
from bench.bare import Upstream, main, parse_route, serve
from trioproxy.snapshot import Origin
from trioproxy.testing.fake_upstream import FakeUpstream

PROVIDER_KEY = "sk-upstream-test"
KEY_PLAIN = "sk-client-plain"  # -> the first fake, no prefix
KEY_PREFIXED = "sk-client-prefixed"  # -> the second fake, under the /v1 prefix
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Lane:
    url: str
    plain: FakeUpstream
    plain_port: int
    prefixed: FakeUpstream
    prefixed_port: int


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def _wait_listening(port: int) -> None:
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.01)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def running_lane(*, events: int = 5, chunk_delay: float = 0.0) -> AsyncIterator[Lane]:
    """Two fakes behind one bare forwarder; ``serve`` runs forever, so the nursery is cancelled at the end."""
    plain = FakeUpstream(accepted_keys=(PROVIDER_KEY,), events=events, chunk_delay=chunk_delay)
    prefixed = FakeUpstream(accepted_keys=(PROVIDER_KEY,), events=events, chunk_delay=chunk_delay)
    async with trio.open_nursery() as nursery:
        plain_port: int = await nursery.start(plain.serve)
        prefixed_port: int = await nursery.start(prefixed.serve)
        routes = dict(
            [
                parse_route(f"{KEY_PLAIN}=http://127.0.0.1:{plain_port}"),
                parse_route(f"{KEY_PREFIXED}=http://127.0.0.1:{prefixed_port}/v1/"),
            ]
        )
        # serve() does not report its port: pick a free one and wait until it accepts.
        port = _free_port()
        nursery.start_soon(serve, "127.0.0.1", port, routes, PROVIDER_KEY)
        await _wait_listening(port)
        yield Lane(f"http://127.0.0.1:{port}", plain, plain_port, prefixed, prefixed_port)
        nursery.cancel_scope.cancel()


async def _post(
    url: str, key: str | None, body: dict[str, Any], *, extra: tuple[tuple[str, str], ...] = ()
) -> httpcore.Response:
    headers = [("content-type", "application/json"), *extra]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))  # capitalised, as most SDKs send it
    with trio.fail_after(5):
        async with httpcore.AsyncConnectionPool() as pool:
            response = await pool.request("POST", url, headers=headers, content=json.dumps(body).encode())
            await response.aread()
            return response


def _header(response: httpcore.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key.lower() == name), None)


# -- forwarding ----------------------------------------------------------------------------------------------


async def test_a_known_key_gets_the_upstream_answer_with_the_provider_key_swapped_in() -> None:
    async with running_lane() as lane:
        response = await _post(
            lane.url + "/v1/chat/completions", KEY_PLAIN, CHAT, extra=(("x-trace", "t-1"),)
        )
    assert response.status == 200
    answer = json.loads(response.content)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == lane.plain.text
    assert _header(response, b"content-length") == str(len(response.content)).encode()
    [seen] = lane.plain.captured
    assert lane.prefixed.captured == []
    assert seen.method == "POST"
    assert seen.path == "/v1/chat/completions"
    assert seen.json() == CHAT
    # Exactly one authorization header, the provider's: the client's key never travels on.
    assert [value for name, value in seen.headers if name == "authorization"] == [f"Bearer {PROVIDER_KEY}"]
    assert all(KEY_PLAIN not in value for _, value in seen.headers)
    assert seen.header("host") == f"127.0.0.1:{lane.plain_port}"
    assert seen.header("content-length") == str(len(seen.body))
    assert seen.header("x-trace") == "t-1"  # other end-to-end headers pass through


async def test_each_key_reaches_its_own_upstream_under_its_prefix() -> None:
    async with running_lane() as lane:
        first = await _post(lane.url + "/chat/completions", KEY_PREFIXED, CHAT)
        second = await _post(lane.url + "/v1/chat/completions", KEY_PLAIN, CHAT)
        third = await _post(lane.url + "/chat/completions?trace=1", KEY_PREFIXED, CHAT)
    assert (first.status, second.status, third.status) == (200, 200, 200)
    assert [(c.path, c.query) for c in lane.prefixed.captured] == [
        ("/v1/chat/completions", ""),
        ("/v1/chat/completions", "trace=1"),
    ]
    assert [c.path for c in lane.plain.captured] == ["/v1/chat/completions"]
    assert all(c.header("authorization") == f"Bearer {PROVIDER_KEY}" for c in lane.prefixed.captured)
    assert lane.prefixed.captured[0].header("host") == f"127.0.0.1:{lane.prefixed_port}"


async def test_an_upstream_error_status_is_relayed() -> None:
    async with running_lane() as lane:
        response = await _post(lane.url + "/v1/no-such-route", KEY_PLAIN, CHAT)
    assert response.status == 404
    assert json.loads(response.content)["error"]
    assert [c.path for c in lane.plain.captured] == ["/v1/no-such-route"]


@pytest.mark.parametrize(
    "key", [None, "sk-unknown", KEY_PLAIN.upper()], ids=["no key", "unknown key", "wrong case"]
)
async def test_an_unknown_key_gets_401_and_reaches_no_upstream(key: str | None) -> None:
    async with running_lane() as lane:
        response = await _post(lane.url + "/v1/chat/completions", key, CHAT)
    assert response.status == 401
    assert json.loads(response.content) == {"error": "unknown key"}
    assert _header(response, b"content-type") == b"application/json"
    assert lane.plain.captured == [] and lane.prefixed.captured == []


async def test_requests_on_one_keep_alive_connection_use_their_own_keys() -> None:
    async with running_lane() as lane:
        with trio.fail_after(5):
            async with httpcore.AsyncConnectionPool(max_connections=1) as pool:
                statuses = []
                for key in (KEY_PLAIN, "sk-unknown", KEY_PREFIXED, KEY_PLAIN):
                    target = "/chat/completions" if key == KEY_PREFIXED else "/v1/chat/completions"
                    response = await pool.request(
                        "POST",
                        lane.url + target,
                        headers=[("authorization", f"Bearer {key}")],
                        content=json.dumps(CHAT).encode(),
                    )
                    await response.aread()
                    statuses.append(response.status)
                assert len(pool.connections) == 1
    assert statuses == [200, 401, 200, 200]
    assert len(lane.plain.captured) == 2
    assert len(lane.prefixed.captured) == 1


async def test_a_stream_is_relayed_with_every_event_as_it_comes() -> None:
    events = 6
    async with running_lane(events=events, chunk_delay=0.03) as lane:
        chunks: list[tuple[float, bytes]] = []
        with trio.fail_after(5):
            async with httpcore.AsyncConnectionPool() as pool:
                async with pool.stream(
                    "POST",
                    lane.url + "/chat/completions",
                    headers=[("authorization", f"Bearer {KEY_PREFIXED}")],
                    content=json.dumps(CHAT | {"stream": True}).encode(),
                ) as response:
                    assert response.status == 200
                    assert (_header(response, b"content-type") or b"").startswith(b"text/event-stream")
                    async for chunk in response.aiter_stream():
                        chunks.append((trio.current_time(), chunk))
    body = b"".join(chunk for _, chunk in chunks)
    frames = [frame for frame in body.split(b"\n\n") if frame]
    data = [frame.removeprefix(b"data: ") for frame in frames]
    assert all(frame.startswith(b"data: ") for frame in frames)
    assert data[-1] == b"[DONE]"
    parsed = [json.loads(item) for item in data[:-1]]
    # A role chunk, one chunk per piece, the finish chunk, [DONE]: all of them, in order.
    assert len(data) == events + 3
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in parsed) == lane.prefixed.text
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    # Relayed as the upstream paced it, not buffered to the end.
    assert len(chunks) > 1
    assert chunks[-1][0] - chunks[0][0] >= 0.03 * (events - 1)
    [seen] = lane.prefixed.captured
    assert seen.json()["stream"] is True
    assert seen.header("authorization") == f"Bearer {PROVIDER_KEY}"


# -- the route parser ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "auth", "upstream"),
    [
        (
            "sk-a=http://h:8080/prefix",
            b"Bearer sk-a",
            Upstream(Origin("http", "h", 8080), b"/prefix"),
        ),
        (
            "KEY=http://10.0.0.1:18000/api/v1/",
            b"Bearer KEY",
            Upstream(Origin("http", "10.0.0.1", 18000), b"/api/v1"),
        ),
        ("k=http://h", b"Bearer k", Upstream(Origin("http", "h", 80), b"")),
        ("k=https://api.example.com/", b"Bearer k", Upstream(Origin("https", "api.example.com", 443), b"")),
    ],
)
def test_parse_route(text: str, auth: bytes, upstream: Upstream) -> None:
    assert parse_route(text) == (auth, upstream)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sk-a",  # no "="
        "=http://h:8080",  # no key
        "sk-a=",  # no URL
        "sk-a=h:8080",  # no scheme
        "sk-a=ftp://h:21/x",  # not http(s)
        "sk-a=http://",  # no host
        "sk-a=http:///prefix",  # no host
        "sk-a=http://h:port/x",  # not a port
        "sk-a=http://h:70000",  # out of range
        "k=x=http://h:1",  # the key ends at the first "=": "x=http://h:1" is no URL
    ],
)
def test_parse_route_rejects_malformed_routes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_route(text)


def test_main_reports_a_malformed_route_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def must_not_serve(*_args: object) -> None:
        raise AssertionError("a malformed route must stop main before it serves")

    monkeypatch.setattr(bare, "serve", must_not_serve)  # a parser that let it through must fail, not hang
    with pytest.raises(SystemExit) as exited:
        main(["--port", "1", "--route", "sk-a=ftp://h", "--key", "k"])
    assert exited.value.code == 2
    assert "not CLIENT_KEY=URL" in capsys.readouterr().err
