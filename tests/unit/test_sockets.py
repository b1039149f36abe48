"""FastSocketStream over real TCP connections on 127.0.0.1: trio's stream contract (checkpoints, cancellation
without data loss, trio's errors, close semantics) and the deadline-aware helpers, also on other streams."""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from trioproxy import sockets
from trioproxy.sockets import RECEIVE_SIZE, FastSocketStream

Pair = tuple[FastSocketStream, FastSocketStream]
SMALL_BUFFER = 64 * 1024  # the kernel doubles it; a few MB can never fit in both ends' buffers
LARGE = 8 * 1024 * 1024


# -- connected pairs -----------------------------------------------------------------------------------------


async def _tcp_trio_sockets(
    buffer_size: int | None = None,
) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A connected (client, server) pair of trio sockets on 127.0.0.1, optionally with small kernel buffers
    (set before connecting, so the accepted socket inherits them and the window never grows past them)."""
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        if buffer_size is not None:
            for sock in (listener, client):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    return client, server


@asynccontextmanager
async def fast_pair(buffer_size: int | None = None) -> AsyncIterator[Pair]:
    client, server = await _tcp_trio_sockets(buffer_size)
    a = FastSocketStream.from_trio_socket(client)
    b = FastSocketStream.from_trio_socket(server)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with fast_pair() as streams:
        yield streams


@pytest.fixture
async def small_pair() -> AsyncIterator[Pair]:
    """A pair whose buffers fill after a few hundred KiB: a sender blocks until its peer reads."""
    async with fast_pair(SMALL_BUFFER) as streams:
        yield streams


async def _reset(stream: FastSocketStream) -> None:
    """Close abruptly: SO_LINGER with a zero timeout makes close() send an RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def _wait_readable(stream: FastSocketStream) -> None:
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(stream.socket)


def _drain(stream: FastSocketStream) -> bytes:
    """Everything already waiting in ``stream``'s receive buffer."""
    received = bytearray()
    while (data := stream.receive_nowait()) is not None and data:
        received += data
    return bytes(received)


def _fill(sender: FastSocketStream) -> int:
    """Send until both ends' buffers are full (the peer never reads); returns the bytes accepted."""
    chunk = b"f" * 65536
    total = 0
    while True:
        try:
            total += sender.socket.send(chunk)
        except BlockingIOError:
            return total


async def _keep_sending(send: Callable[[], Awaitable[object]]) -> None:
    """Send a few times: the peer's RST is processed at once on loopback, the repeats are margin."""
    for _ in range(100):
        await send()


async def _receive(stream: trio.abc.ReceiveStream, max_bytes: int | None = None) -> bytes:
    """``receive_some`` that fails the test instead of hanging it."""
    with trio.fail_after(5):
        return bytes(await stream.receive_some(max_bytes))


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    with trio.fail_after(5):
        while len(received) < size:
            data = await stream.receive_some()
            assert data, f"EOF after {len(received)} of {size} bytes"
            received += data
    return bytes(received)


# -- moving bytes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_a_round_trip_in_both_directions(pair: Pair, kind: Callable[[bytes], object]) -> None:
    a, b = pair
    payload = kind(b"hello over tcp")
    assert isinstance(payload, bytes | bytearray | memoryview)
    await a.send_all(payload)
    assert await _receive_exactly(b, 14) == b"hello over tcp"
    await b.send_all(b"and back")
    assert await _receive_exactly(a, 8) == b"and back"


async def test_receive_some_honours_max_bytes(pair: Pair) -> None:
    a, b = pair
    await a.send_all(b"abcdefgh")
    await _wait_readable(b)
    assert await _receive(b, 3) == b"abc"
    assert await _receive(b, 100) == b"defgh"


async def test_receive_some_reads_at_most_receive_size_by_default(pair: Pair) -> None:
    a, b = pair
    await a.send_all(b"x" * (RECEIVE_SIZE * 3))
    await _wait_readable(b)
    first = await _receive(b)
    assert 0 < len(first) <= RECEIVE_SIZE
    assert await _receive_exactly(b, RECEIVE_SIZE * 3 - len(first)) == b"x" * (RECEIVE_SIZE * 3 - len(first))


async def test_a_large_payload_waits_for_the_reader_and_arrives_intact(small_pair: Pair) -> None:
    a, b = small_pair
    payload = random.Random(6).randbytes(LARGE)
    sent = trio.Event()
    received: list[bytes] = []

    async def send() -> None:
        await a.send_all(payload)
        sent.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            # The buffers are full and nobody reads: the sender is parked waiting for writability.
            assert not sent.is_set()
            assert b.is_readable()
            while sum(map(len, received)) < LARGE:
                data = await b.receive_some()
                assert data
                received.append(data)
    assert sent.is_set()
    assert len(received) > 1
    assert b"".join(received) == payload


async def test_large_payloads_cross_in_both_directions_at_once(pair: Pair) -> None:
    a, b = pair
    to_b = random.Random(1).randbytes(4 * 1024 * 1024)
    to_a = random.Random(2).randbytes(3 * 1024 * 1024)
    results: dict[str, bytes] = {}

    async def collect(name: str, stream: FastSocketStream, size: int) -> None:
        results[name] = await _receive_exactly(stream, size)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_all, to_b)
            nursery.start_soon(b.send_all, to_a)
            nursery.start_soon(collect, "b", b, len(to_b))
            nursery.start_soon(collect, "a", a, len(to_a))
    assert results["b"] == to_b
    assert results["a"] == to_a


async def test_eof_reads_as_empty_bytes(pair: Pair) -> None:
    a, b = pair
    await a.send_all(b"last words")
    await a.aclose()
    assert await _receive_exactly(b, 10) == b"last words"
    assert await _receive(b) == b""
    assert await _receive(b) == b""  # EOF is sticky


# -- errors --------------------------------------------------------------------------------------------------


async def test_a_peer_reset_breaks_receive(pair: Pair) -> None:
    a, b = pair
    await _reset(b)
    with pytest.raises(trio.BrokenResourceError) as caught:
        await _receive(a)
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ECONNRESET


async def test_a_peer_reset_breaks_receive_nowait_and_receive_some_before(pair: Pair) -> None:
    a, b = pair
    await _reset(b)
    with pytest.raises(trio.BrokenResourceError):
        a.receive_nowait()
    # The first error consumed the pending ECONNRESET; later reads see the dead socket as EOF or an error,
    # never data and never a hang.
    with trio.fail_after(5):
        try:
            result = await a.receive_some_before(trio.current_time() + 5)
        except trio.BrokenResourceError:
            result = b""
    assert result == b""


async def test_a_peer_reset_breaks_send_all(pair: Pair) -> None:
    a, b = pair
    await _reset(b)
    with pytest.raises(trio.BrokenResourceError) as caught:
        await _keep_sending(lambda: a.send_all(b"into the void"))
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno in (errno.ECONNRESET, errno.EPIPE)


async def test_a_peer_reset_breaks_send_all_before(pair: Pair) -> None:
    a, b = pair
    await _reset(b)
    with pytest.raises(trio.BrokenResourceError):
        await _keep_sending(lambda: a.send_all_before(b"into the void", trio.current_time() + 5))


async def test_a_reset_while_a_send_waits_breaks_it(small_pair: Pair) -> None:
    a, b = small_pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await a.send_all(b"z" * LARGE)

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await _reset(b)


async def test_translate_maps_errnos_to_trio_errors() -> None:
    assert isinstance(sockets._translate(OSError(errno.EBADF, "x")), trio.ClosedResourceError)
    for code in (errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN):
        translated = sockets._translate(OSError(code, "x"))
        assert type(translated) is trio.BrokenResourceError
        assert errno.errorcode[code] in str(translated)
    other = sockets._translate(OSError(errno.EHOSTUNREACH, "x"))
    assert type(other) is trio.BrokenResourceError
    assert str(errno.EHOSTUNREACH) in str(other)


# -- closing -------------------------------------------------------------------------------------------------

StreamOp = Callable[[FastSocketStream], Awaitable[object]]

OPERATIONS: dict[str, StreamOp] = {
    "receive_some": lambda s: s.receive_some(),
    "receive_some_before": lambda s: s.receive_some_before(trio.current_time() + 5),
    "send_all": lambda s: s.send_all(b"data"),
    "send_all_before": lambda s: s.send_all_before(b"data", trio.current_time() + 5),
    "send_eof": lambda s: s.send_eof(),
    "wait_send_all_might_not_block": lambda s: s.wait_send_all_might_not_block(),
    "helper_receive_some_before": lambda s: sockets.receive_some_before(s, trio.current_time() + 5),
    "helper_send_all_before": lambda s: sockets.send_all_before(s, b"data", trio.current_time() + 5),
}


@pytest.mark.parametrize("name", OPERATIONS)
async def test_use_after_aclose_raises_closed_resource_error(pair: Pair, name: str) -> None:
    a, b = pair
    await b.send_all(b"pending")  # data waiting must not make a closed stream readable
    await _wait_readable(a)
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await OPERATIONS[name](a)


async def test_receive_nowait_after_aclose_raises_closed_resource_error(pair: Pair) -> None:
    a, _ = pair
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        a.receive_nowait()


async def test_sending_nothing_after_aclose_raises_closed_resource_error(pair: Pair) -> None:
    # Regression: send_all and send_all_before used to check ``self._closed`` only inside their ``while view:``
    # loop, so an empty payload on a closed stream returned normally (send_all_before even returned True)
    # instead of raising trio.ClosedResourceError as trio.SocketStream does and the module docstring promises.
    a, _ = pair
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"")
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all_before(b"", trio.current_time() + 5)


async def test_aclose_is_idempotent_and_closes_the_descriptor(pair: Pair) -> None:
    a, b = pair
    with trio.testing.assert_checkpoints():
        await a.aclose()
    assert a.socket.fileno() == -1
    with trio.testing.assert_checkpoints():
        await a.aclose()  # a second close neither raises nor skips the checkpoint
    assert await _receive(b) == b""  # the peer saw a FIN


BLOCKED_OPERATIONS: dict[str, StreamOp] = {
    "receive_some": lambda s: s.receive_some(),
    "receive_some_before": lambda s: s.receive_some_before(trio.current_time() + 60),
    "send_all": lambda s: s.send_all(b"s" * LARGE),
    "send_all_before": lambda s: s.send_all_before(b"s" * LARGE, trio.current_time() + 60),
    "wait_send_all_might_not_block": lambda s: s.wait_send_all_might_not_block(),
}


@pytest.mark.parametrize("name", BLOCKED_OPERATIONS)
async def test_aclose_wakes_a_task_blocked_on_the_stream(small_pair: Pair, name: str) -> None:
    a, _ = small_pair
    if name == "wait_send_all_might_not_block":
        _fill(a)
    outcome: list[str] = []

    async def blocked() -> None:
        try:
            await BLOCKED_OPERATIONS[name](a)
        except trio.ClosedResourceError:
            outcome.append("closed")
        else:
            outcome.append("returned")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == []  # really blocked in the kernel wait
            await a.aclose()
    assert outcome == ["closed"]


# -- half-close ----------------------------------------------------------------------------------------------


async def test_send_eof_half_closes(pair: Pair) -> None:
    a, b = pair
    await a.send_all(b"request")
    await a.send_eof()
    assert await _receive_exactly(b, 7) == b"request"
    assert await _receive(b) == b""  # the peer sees EOF after the data...
    await b.send_all(b"response")  # ...and can still answer
    await b.aclose()
    assert await _receive_exactly(a, 8) == b"response"
    assert await _receive(a) == b""


async def test_send_eof_is_idempotent(pair: Pair) -> None:
    a, b = pair
    await a.send_eof()
    await a.send_eof()
    assert await _receive(b) == b""


async def test_sending_after_send_eof_fails(pair: Pair) -> None:
    a, b = pair
    await a.send_eof()
    with pytest.raises((trio.ClosedResourceError, trio.BrokenResourceError)):
        await a.send_all(b"too late")
    assert await _receive(b) == b""


# -- non-blocking reads and readability ----------------------------------------------------------------------


async def test_receive_nowait_returns_none_then_data_then_eof(pair: Pair) -> None:
    a, b = pair
    with trio.testing.assert_no_checkpoints():
        assert b.receive_nowait() is None
    await a.send_all(b"ready")
    await _wait_readable(b)
    with trio.testing.assert_no_checkpoints():
        assert b.receive_nowait(2) == b"re"
        assert b.receive_nowait() == b"ady"
        assert b.receive_nowait() is None
    await a.aclose()
    await _wait_readable(b)
    assert b.receive_nowait() == b""


async def test_is_readable_reflects_pending_data_and_eof(pair: Pair) -> None:
    a, b = pair
    assert not b.is_readable()
    await a.send_all(b"x")
    await _wait_readable(b)
    assert b.is_readable()
    assert b.receive_nowait() == b"x"
    assert not b.is_readable()
    await a.send_eof()
    await _wait_readable(b)
    assert b.is_readable()
    assert not a.is_readable()  # half-closing our side does not make our side readable


async def test_wait_send_all_might_not_block_waits_for_room(small_pair: Pair) -> None:
    a, b = small_pair
    with trio.fail_after(1):
        await a.wait_send_all_might_not_block()  # an empty buffer: at once
    _fill(a)
    room = trio.Event()

    async def wait_room() -> None:
        await a.wait_send_all_might_not_block()
        room.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_room)
            await trio.testing.wait_all_tasks_blocked()
            assert not room.is_set()
            while not room.is_set():
                _drain(b)
                await trio.sleep(0.001)


# -- deadlines (virtual time) --------------------------------------------------------------------------------


async def test_receive_some_before_gives_none_at_the_deadline(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    _, b = pair
    deadline = trio.current_time() + 30
    assert await b.receive_some_before(deadline) is None
    assert trio.current_time() == pytest.approx(deadline)
    assert await sockets.receive_some_before(b, deadline + 30) is None
    assert trio.current_time() == pytest.approx(deadline + 30)


async def test_receive_some_before_returns_data_that_comes_first(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = pair
    start = trio.current_time()

    async def send_later() -> None:
        await trio.sleep(5)
        await a.send_all(b"in time")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        data = await b.receive_some_before(start + 30, 4)
    assert data == b"in t"
    assert trio.current_time() == pytest.approx(start + 5)
    assert await b.receive_some_before(start + 30) == b"ime"
    await a.aclose()
    assert await sockets.receive_some_before(b, start + 30) == b""  # EOF before the deadline


async def test_data_already_waiting_beats_a_past_deadline(pair: Pair) -> None:
    # Documented: data already waiting is read without building a cancel scope, so even a deadline in the
    # past returns it; an immediate send likewise reports success. (The module-level helpers must reach the
    # FastSocketStream methods for this: the generic path would give None/False.)
    a, b = pair
    past = trio.current_time() - 1
    assert await sockets.send_all_before(a, b"early", past) is True
    await _wait_readable(b)
    assert await sockets.receive_some_before(b, past) == b"early"
    assert await b.receive_some_before(past) is None  # nothing waiting: the deadline applies


async def test_send_all_before_gives_false_when_the_peer_never_reads(
    small_pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = small_pair
    deadline = trio.current_time() + 20
    assert await a.send_all_before(b"w" * LARGE, deadline) is False
    assert trio.current_time() == pytest.approx(deadline)
    # The stream is mid-message: a prefix of it went out, not all of it.
    assert 0 < len(_drain(b)) < LARGE


async def test_send_all_before_gives_true_when_everything_goes_out(
    small_pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = small_pair
    start = trio.current_time()
    assert await a.send_all_before(b"small", start + 10) is True
    assert await _receive_exactly(b, 5) == b"small"
    payload = random.Random(3).randbytes(LARGE)
    received: list[bytes] = []

    async def read_slowly() -> None:
        await trio.sleep(1)
        received.append(await _receive_exactly(b, LARGE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        assert await sockets.send_all_before(a, payload, start + 10) is True
    assert received == [payload]
    assert trio.current_time() < start + 10


# -- checkpoints and cancellation ----------------------------------------------------------------------------

CHECKPOINTED: dict[str, StreamOp] = {
    "receive_some": lambda s: s.receive_some(),
    "receive_some_before": lambda s: s.receive_some_before(trio.current_time() + 5),
    "send_all": lambda s: s.send_all(b"data"),
    "send_all_before": lambda s: s.send_all_before(b"data", trio.current_time() + 5),
    "send_eof": lambda s: s.send_eof(),
    "aclose": lambda s: s.aclose(),
}


@pytest.mark.parametrize("name", CHECKPOINTED)
async def test_every_operation_that_succeeds_at_once_is_a_checkpoint(pair: Pair, name: str) -> None:
    # "a receive that got data is a schedule point": assert_checkpoints wants a cancel point *and* a schedule
    # point, so a read (or send) that returns without yielding to the scheduler fails here.
    a, b = pair
    await b.send_all(b"waiting")
    await _wait_readable(a)
    with trio.testing.assert_checkpoints():
        await CHECKPOINTED[name](a)


@pytest.mark.parametrize("name", ["receive_some", "receive_some_before", "helper_receive_some_before"])
async def test_a_cancelled_receive_consumes_nothing(pair: Pair, name: str) -> None:
    a, b = pair
    await a.send_all(b"keep me")
    await _wait_readable(b)
    reached = False
    with trio.CancelScope() as scope:
        scope.cancel()
        await OPERATIONS[name](b)
        reached = True
    assert scope.cancelled_caught and not reached
    assert b.receive_nowait() == b"keep me"


@pytest.mark.parametrize("name", ["send_all", "send_all_before", "helper_send_all_before", "send_eof"])
async def test_a_cancelled_send_sends_nothing(pair: Pair, name: str) -> None:
    a, b = pair
    reached = False
    with trio.CancelScope() as scope:
        scope.cancel()
        await OPERATIONS[name](a)
        reached = True
    assert scope.cancelled_caught and not reached
    await a.send_all(b"!")  # a marker: whatever came before it would be read first
    await _wait_readable(b)
    assert b.receive_nowait() == b"!"  # neither data nor EOF went out


async def test_a_cancelled_wait_send_all_might_not_block_raises_cancelled(pair: Pair) -> None:
    a, _ = pair
    with trio.CancelScope() as scope:
        scope.cancel()
        await a.wait_send_all_might_not_block()
    assert scope.cancelled_caught


async def test_a_cancelled_aclose_still_closes(pair: Pair) -> None:
    a, b = pair
    with trio.CancelScope() as scope:
        scope.cancel()
        await a.aclose()
    assert scope.cancelled_caught
    assert a.socket.fileno() == -1
    assert await _receive(b) == b""


class _CancelAfterRecv(socket.socket):
    """A socket that cancels a scope right after a recv returned data: the cancellation lands on the
    schedule point that follows the syscall, the one place a careless stream would drop the bytes."""

    scope: trio.CancelScope | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if data and self.scope is not None:
            self.scope.cancel()
        return data


@pytest.mark.parametrize("name", ["receive_some", "receive_some_before"])
async def test_a_cancellation_after_the_recv_does_not_lose_the_bytes(name: str) -> None:
    client, server = await _tcp_trio_sockets()
    raw = _CancelAfterRecv(server.family, server.type, server.proto, fileno=server.detach())
    a = FastSocketStream.from_trio_socket(client)
    b = FastSocketStream(raw)
    try:
        await a.send_all(b"precious")
        await _wait_readable(b)
        got: object = None
        with trio.CancelScope() as scope:
            raw.scope = scope
            got = await OPERATIONS[name](b)
        assert scope.cancel_called
        assert got == b"precious"
    finally:
        await a.aclose()
        await b.aclose()


# -- the module-level helpers on other streams ---------------------------------------------------------------


async def test_helpers_on_a_memory_stream(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = trio.testing.memory_stream_pair()
    start = trio.current_time()
    assert await sockets.receive_some_before(receive, start + 10) is None
    assert trio.current_time() == pytest.approx(start + 10)
    assert await sockets.send_all_before(send, b"memory", start + 20) is True
    data = await sockets.receive_some_before(receive, start + 20)
    assert data == b"memory"
    assert type(data) is bytes
    await send.aclose()
    assert await sockets.receive_some_before(receive, start + 20) == b""


async def test_send_all_before_on_a_stream_nobody_reads(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = trio.testing.lockstep_stream_pair()  # send_all waits until the data is received
    deadline = trio.current_time() + 15
    assert await sockets.send_all_before(send, b"stuck", deadline) is False
    assert trio.current_time() == pytest.approx(deadline)
    send, receive = trio.testing.lockstep_stream_pair()  # the first one is mid-message now

    async def read() -> None:
        await trio.sleep(1)
        assert await receive.receive_some() == b"flows"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        assert await sockets.send_all_before(send, b"flows", deadline + 15) is True


async def test_helpers_on_a_trio_socket_stream(autojump_clock: trio.testing.MockClock) -> None:
    client, server = await _tcp_trio_sockets(SMALL_BUFFER)
    a, b = trio.SocketStream(client), trio.SocketStream(server)
    async with a, b:
        start = trio.current_time()
        assert await sockets.receive_some_before(b, start + 5) is None
        assert trio.current_time() == pytest.approx(start + 5)
        assert await sockets.send_all_before(a, b"socket", start + 10) is True
        assert await sockets.receive_some_before(b, start + 10) == b"socket"
        assert await sockets.send_all_before(a, b"q" * LARGE, start + 20) is False
        assert trio.current_time() == pytest.approx(start + 20)


# -- construction --------------------------------------------------------------------------------------------


async def test_from_trio_socket_takes_over_the_descriptor() -> None:
    client, server = await _tcp_trio_sockets()
    fd = client.fileno()
    family, kind = client.family, client.type
    a = FastSocketStream.from_trio_socket(client)
    b = FastSocketStream.from_trio_socket(server)
    try:
        assert client.fileno() == -1  # detached: closing the trio socket can no longer close ours
        client.close()
        assert a.socket.fileno() == fd
        assert (a.socket.family, a.socket.type) == (family, kind)
        assert a.socket.getblocking() is False
        await a.send_all(b"still works")
        assert await _receive_exactly(b, 11) == b"still works"
    finally:
        await a.aclose()
        await b.aclose()


async def test_the_constructor_makes_the_socket_non_blocking() -> None:
    left, right = socket.socketpair()
    assert left.getblocking()
    a, b = FastSocketStream(left), FastSocketStream(right)
    try:
        assert not a.socket.getblocking()
        assert a.receive_nowait() is None  # would hang forever on a blocking socket
        await b.send_all(b"unix")
        assert await _receive(a) == b"unix"
    finally:
        await a.aclose()
        await b.aclose()


async def test_getpeername_and_setsockopt(pair: Pair) -> None:
    a, b = pair
    host, port = b.socket.getsockname()
    assert a.getpeername() == (host, port)
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    assert a.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    assert a.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
