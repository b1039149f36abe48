"""The supervisor-worker channel: frames split anywhere, and two Channels over a real socket pair.

Channel tests run on the autojump clock: the sockets are in-process, so whatever one side wrote is readable at
once, and a channel that deadlocks fails at its guard deadline in no real time.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy import ipc
from trioproxy.ipc import (
    MAX_FRAME_BYTES,
    MAX_OUTBOX,
    SEND_TIMEOUT,
    Channel,
    ChannelBroken,
    ChannelClosed,
    FrameDecoder,
    RemoteError,
    encode_frame,
)

# What pickle raises for a lambda (PicklingError) or a local function (AttributeError).
CANT_PICKLE = r"(PicklingError|AttributeError): Can't pickle"
# A test that waits longer than this (virtual time) for the channel is a deadlock.
GUARD = 30.0

# -- FrameDecoder (sans-IO) ------------------------------------------------------------------------------------

_VALUES = st.recursive(
    st.integers() | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4),
    max_leaves=12,
)
_MESSAGES = st.lists(st.tuples(_VALUES, _VALUES, _VALUES, _VALUES), max_size=8)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def _decode(chunks: list[bytes]) -> list[tuple[Any, ...]]:
    decoder = FrameDecoder()
    out: list[tuple[Any, ...]] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    assert repr(decoder) == "<FrameDecoder buffered=0>"
    return out


@settings(max_examples=examples(100), deadline=None)
@given(messages=_MESSAGES, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_decodes_the_same_messages_in_order(
    messages: list[tuple[Any, Any, Any, Any]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    assert _decode([stream]) == messages
    assert _decode([stream[i : i + 1] for i in range(len(stream))]) == messages
    assert _decode(_split(stream, cuts)) == messages


def test_a_partial_frame_stays_buffered() -> None:
    frame = encode_frame(("note", 0, "key_state", (7, {"state": "invalid"})))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:2]) == []  # not even the whole length yet
    assert decoder.feed(frame[2:-1]) == []
    assert repr(decoder) == f"<FrameDecoder buffered={len(frame) - 1}>"
    assert decoder.feed(frame[-1:] + frame[:5]) == [("note", 0, "key_state", (7, {"state": "invalid"}))]
    assert repr(decoder) == "<FrameDecoder buffered=5>"


def test_a_length_over_the_limit_breaks_at_once() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    assert decoder.feed(struct.pack(">I", 100)) == []  # at the limit: waits for the payload
    with pytest.raises(ChannelBroken, match="a frame of 101 bytes is over the limit of 100"):
        FrameDecoder(max_frame_bytes=100).feed(struct.pack(">I", 101))
    # Only the header of a huge frame: the decoder does not wait for (or buffer) 16 MB first.
    with pytest.raises(ChannelBroken, match="over the limit"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_BYTES + 1))


def test_a_frame_that_does_not_unpickle_breaks() -> None:
    payload = b"\x80\x05garbage that is no pickle"
    with pytest.raises(ChannelBroken, match="does not unpickle"):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


@pytest.mark.parametrize("value", [("call", 1, "reserve"), ["call", 1, "reserve", ()], "call", 5])
def test_a_frame_that_is_not_a_message_tuple_breaks(value: object) -> None:
    payload = pickle.dumps(value)
    good = encode_frame(("note", 0, "x", ()))
    decoder = FrameDecoder()
    with pytest.raises(ChannelBroken, match="not a message tuple"):
        decoder.feed(good + struct.pack(">I", len(payload)) + payload)


def test_encoding_a_message_over_the_limit_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc, "MAX_FRAME_BYTES", 1000)
    assert len(encode_frame(("note", 0, "x", (b"a" * 500,)))) < 1000
    with pytest.raises(ChannelBroken, match=r"'note' message of \d+ bytes is over the frame limit"):
        encode_frame(("note", 0, "x", (b"a" * 2000,)))


# -- Channel over a socket pair --------------------------------------------------------------------------------


@dataclass
class Side:
    """A running channel, and how its run ended."""

    channel: Channel
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    returned: bool = False  # run() returned by itself (not cancelled)
    ended: trio.Event = field(default_factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.channel.run(task_status=task_status)
                self.returned = True
        finally:
            self.ended.set()

    async def wait_ended(self) -> None:
        with trio.fail_after(GUARD):
            await self.ended.wait()


async def start(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    name: str,
    handlers: Mapping[str, Callable[..., Any]] | None = None,
    async_handlers: Mapping[str, Callable[..., Any]] | None = None,
) -> Side:
    side = Side(Channel(stream, name, handlers=handlers, async_handlers=async_handlers))
    await nursery.start(side.run)
    return side


async def pair(
    nursery: trio.Nursery,
    handlers: Mapping[str, Callable[..., Any]] | None = None,
    async_handlers: Mapping[str, Callable[..., Any]] | None = None,
) -> tuple[Side, Side]:
    """A caller ``a`` (no handlers) and a callee ``b`` with the given handlers, on a real socket pair."""
    sock_a, sock_b = trio.socket.socketpair()
    a = await start(nursery, trio.SocketStream(sock_a), "a")
    b = await start(nursery, trio.SocketStream(sock_b), "b", handlers, async_handlers)
    return a, b


def _add(x: int, y: int) -> int:
    return x + y


def _fail(text: str) -> None:
    raise ValueError(text)


async def test_a_call_returns_the_handlers_value(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = await pair(nursery, {"add": _add, "echo": lambda *args: args})
    with trio.fail_after(GUARD):
        assert await a.channel.call("add", 2, 3) == 5
        payload = (1, "two", b"\x00three", [4, [5]], {"six": 6.0})
        assert await a.channel.call("echo", *payload) == payload
    assert repr(a.channel) == "<Channel a open pending=0 outbox=0>"
    assert not a.channel.closed and not a.ended.is_set() and not b.ended.is_set()


async def test_a_handler_error_and_an_unknown_method_are_remote_errors(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def async_fail() -> None:
        raise KeyError("gone")

    a, _ = await pair(nursery, {"fail": _fail, "add": _add}, {"async_fail": async_fail})
    with trio.fail_after(GUARD):
        with pytest.raises(RemoteError, match=r"^a: fail failed in the other process: ValueError: bad plan$"):
            await a.channel.call("fail", "bad plan")
        with pytest.raises(RemoteError, match="async_fail failed in the other process: KeyError: 'gone'"):
            await a.channel.call("async_fail")
        with pytest.raises(RemoteError, match="LookupError: no handler for 'missing'"):
            await a.channel.call("missing", 1)
        assert await a.channel.call("add", 1, 1) == 2  # none of that hurt the channel


async def test_notes_reach_a_sync_handler_in_order_before_a_later_call(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[int] = []
    a, _ = await pair(nursery, {"seen": seen.append, "count": lambda: len(seen)})
    for i in range(1000):
        a.channel.notify("seen", i)
    with trio.fail_after(GUARD):
        # Sync handlers run inline in arrival order: the call is answered after every note before it.
        assert await a.channel.call("count") == 1000
    assert seen == list(range(1000))
    assert a.channel.dropped_notes == 0


async def test_a_note_whose_handler_fails_is_logged_and_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await pair(nursery, {"fail": _fail, "add": _add})
    with caplog.at_level(logging.ERROR, logger="trioproxy.ipc"):
        a.channel.notify("fail", "no such key")
        a.channel.notify("missing")
        with trio.fail_after(GUARD):
            assert await a.channel.call("add", 2, 2) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert "b: note fail failed: ValueError: no such key" in messages
    assert "b: note missing failed: LookupError: no handler for 'missing'" in messages


async def test_a_slow_async_handler_does_not_hold_up_a_sync_call_behind_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    entered, release = trio.Event(), trio.Event()

    async def slow(value: str) -> str:
        entered.set()
        await release.wait()
        return value.upper()

    a, _ = await pair(nursery, {"fast": lambda: "fast"}, {"slow": slow})
    results: list[str] = []

    async def call_slow() -> None:
        results.append(await a.channel.call("slow", "slow"))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as callers:
            callers.start_soon(call_slow)
            await entered.wait()  # the slow handler is running in the other channel
            assert await a.channel.call("fast") == "fast"
            assert results == []  # the fast call overtook it
            release.set()
    assert results == ["SLOW"]


async def test_a_callers_deadline_and_the_late_reply_leave_the_channel_working(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    finished = trio.Event()

    async def slow() -> str:
        await trio.sleep(5)
        finished.set()
        return "late"

    a, b = await pair(nursery, {"add": _add}, {"slow": slow})
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(1):
            await a.channel.call("slow")
    assert trio.current_time() - started == pytest.approx(1)
    assert repr(a.channel) == "<Channel a open pending=0 outbox=0>"
    with trio.fail_after(GUARD):
        await finished.wait()
        await trio.sleep(1)  # the late reply reaches a, which has nobody waiting for it
        assert await a.channel.call("add", 20, 22) == 42
    assert not a.ended.is_set() and not b.ended.is_set()


async def test_a_peer_that_closes_fails_pending_calls_and_ends_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    entered = trio.Event()

    async def hang() -> None:
        entered.set()
        await trio.sleep_forever()

    a, b = await pair(nursery, {"add": _add}, {"hang": hang})
    errors: list[BaseException] = []

    async def call_hang() -> None:
        try:
            await a.channel.call("hang")
        except ChannelClosed as exc:
            errors.append(exc)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as callers:
            callers.start_soon(call_hang)
            await entered.wait()
            b.scope.cancel()  # the other process exits
    assert [type(e) for e in errors] == [ChannelClosed]
    assert str(errors[0]) == "a: the channel is closed"
    await a.wait_ended()
    assert a.returned and a.channel.closed  # a's run returned by itself
    assert not b.returned and b.channel.closed
    with pytest.raises(ChannelClosed):
        await a.channel.call("add", 1, 2)
    # A note after the end never waits and never raises: it is dropped and counted.
    assert a.channel.dropped_notes == 0
    a.channel.notify("add", 1, 2)
    a.channel.notify("add", 3, 4)
    assert a.channel.dropped_notes == 2
    assert repr(a.channel) == "<Channel a closed pending=0 outbox=0>"


async def test_notes_past_a_full_outbox_are_dropped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    sock_a, sock_b = trio.socket.socketpair()
    with sock_a, sock_b:
        channel = Channel(trio.SocketStream(sock_a), "full")  # not running: nothing drains the outbox
        with caplog.at_level(logging.WARNING, logger="trioproxy.ipc"):
            for i in range(MAX_OUTBOX + 5):
                channel.notify("x", i)
    assert channel.dropped_notes == 5
    assert repr(channel) == f"<Channel full open pending=0 outbox={MAX_OUTBOX}>"
    assert [r.getMessage() for r in caplog.records] == ["full: 1 notes dropped so far"]  # once, not per note


async def test_an_unpicklable_result_is_a_remote_error_not_a_hang(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def async_lambda() -> Callable[[], int]:
        return lambda: 1

    big = b"x" * 4000
    a, _ = await pair(
        nursery,
        {"lambda": lambda: lambda: 1, "big": lambda: big, "add": _add},
        {"async_lambda": async_lambda},
    )
    with trio.fail_after(GUARD):
        with pytest.raises(
            RemoteError,
            match=rf"^a: lambda failed in the other process: {CANT_PICKLE}",
        ):
            await a.channel.call("lambda")
        with pytest.raises(
            RemoteError,
            match=rf"^a: async_lambda failed in the other process: {CANT_PICKLE}",
        ):
            await a.channel.call("async_lambda")
        monkeypatch.setattr(ipc, "MAX_FRAME_BYTES", 1000)  # encode_frame reads it at every call
        with pytest.raises(
            RemoteError, match="big failed in the other process: ChannelBroken: a 'reply' message"
        ):
            await a.channel.call("big")
        assert await a.channel.call("add", 1, 2) == 3


class _Unpicklable:
    """Pickling it raises ValueError, an error pickle does not promise never to raise (RecursionError too)."""

    def __reduce__(self) -> str:
        raise ValueError("cannot travel")


async def test_a_result_whose_pickling_raises_anything_is_a_remote_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = await pair(nursery, {"odd": _Unpicklable, "add": _add})
    with trio.fail_after(GUARD), pytest.raises(RemoteError, match="ValueError: cannot travel"):
        await a.channel.call("odd")
    assert not b.ended.is_set()


async def _raw_pair(nursery: trio.Nursery) -> tuple[Side, trio.socket.SocketType]:
    sock_a, raw = trio.socket.socketpair()
    side = await start(nursery, trio.SocketStream(sock_a), "a", {"add": _add})
    return side, raw


@pytest.mark.parametrize(
    ("data", "logged"),
    [
        (struct.pack(">I", MAX_FRAME_BYTES + 1), "a frame of 16777217 bytes is over the limit"),
        (struct.pack(">I", 0xFFFFFFFF), "a frame of 4294967295 bytes is over the limit"),
        (struct.pack(">I", 4) + b"junk", "a frame does not unpickle: UnpicklingError"),
        (encode_frame(("call", 1, "add")), "a frame is not a message tuple"),
        (encode_frame(("bogus", 1, "add", (1, 2))), "a: a message of unknown kind 'bogus'"),
    ],
)
async def test_a_broken_frame_closes_the_receiving_channel(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    logged: str,
) -> None:
    side, raw = await _raw_pair(nursery)
    with raw:
        errors: list[BaseException] = []

        async def pending_call() -> None:
            try:
                await side.channel.call("anything")
            except ChannelClosed as exc:
                errors.append(exc)

        with caplog.at_level(logging.ERROR, logger="trioproxy.ipc"):
            # A frame answered before the broken one is still handled.
            await raw.send(encode_frame(("call", 7, "add", (1, 2))))
            async with trio.open_nursery() as callers:
                callers.start_soon(pending_call)
                await trio.testing.wait_all_tasks_blocked()
                await raw.send(data)
                await side.wait_ended()
        assert side.returned and side.channel.closed
        assert [type(e) for e in errors] == [ChannelClosed]
        assert any(logged in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        received = b""
        with trio.fail_after(GUARD):
            while chunk := await raw.recv(65536):
                received += chunk
        messages = FrameDecoder().feed(received)
        assert ("reply", 7, True, 3) in messages  # then EOF: the channel closed its end


async def test_a_peer_that_stops_reading_is_dropped_after_the_send_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    side, raw = await _raw_pair(nursery)
    with raw, caplog.at_level(logging.ERROR, logger="trioproxy.ipc"):
        started = trio.current_time()
        # Far more than the socket buffers hold, and nobody reads the other end.
        side.channel.notify("blob", b"\x00" * (4 * 1024 * 1024))
        await side.wait_ended()
        assert trio.current_time() - started == pytest.approx(SEND_TIMEOUT)
    assert side.returned and side.channel.closed
    assert "a: the other process stopped reading: closing the channel" in [
        r.getMessage() for r in caplog.records
    ]
    side.channel.notify("blob", b"")
    assert side.channel.dropped_notes == 1
