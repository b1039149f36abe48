"""Load generators: wrk when installed, else a built-in trio client; closed loop, open loop, streams, idle conns.

- **Closed loop** (:func:`closed_loop`): ``concurrency`` connections each send a request, wait for the whole
  answer, and send the next, for ``duration`` seconds. With wrk on the PATH it runs
  ``wrk -t1 -cC -dDs --timeout 10s -s post.lua URL`` (the method of perf-anchors.md); otherwise the built-in
  client below.
- **Open loop** (:class:`OpenLoop`): requests *start* at a constant rate whatever the answers do (no coordinated
  omission): latency is measured from each request's scheduled start, so queueing in the proxy shows up.
  wrk cannot pace requests (wrk2 can, but is not packaged), so this is always the built-in client.
- **Streams** (:func:`stream_once`): timestamps every socket read and every SSE event of one streamed answer.

The built-in client is a minimal HTTP/1.1 client over trio sockets (requests are pre-serialised bytes; answers
are parsed only for framing: status, Content-Length or chunked), because httpcore's per-request cost would make
the generator the bottleneck. Every run reports the generator's own CPU use (``gen_cpu``: CPU seconds per
wall second; 1.0 means a saturated core), so a table can show it was not the limit.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

REQUEST_TIMEOUT = 10.0
RECEIVE_SIZE = 65536


class HTTPError(Exception):
    """The answer was not HTTP/1.1 we can frame, or the peer closed mid-answer."""


# --------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where one lane serves one scenario: address, path and the headers it needs (its own key)."""

    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def request_bytes(self, body: bytes) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines += ["content-type: application/json", f"content-length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode("latin-1") + body


# ------------------------------------------------------------------------------------ response framing


class ResponseParser:
    """Sans-IO framing of one HTTP/1.1 response: feed bytes, get body pieces (chunked encoding removed)."""

    def __init__(self) -> None:
        self.status = 0
        self.done = False
        self.keep_alive = True
        self._buffer = b""
        self._state = "head"
        self._remaining = 0  # body bytes (Content-Length) or bytes of the current chunk

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        pieces: list[bytes] = []
        while not self.done:
            if self._state == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return pieces
                self._parse_head(self._buffer[:end])
                self._buffer = self._buffer[end + 4 :]
            elif self._state == "length":
                take = self._buffer[: self._remaining]
                self._buffer = self._buffer[len(take) :]
                self._remaining -= len(take)
                if take:
                    pieces.append(take)
                if self._remaining == 0:
                    self.done = True
                else:
                    return pieces
            elif self._state == "size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return pieces
                size_text = self._buffer[:end].split(b";", 1)[0].strip()
                try:
                    self._remaining = int(size_text, 16)
                except ValueError:
                    raise HTTPError(f"bad chunk size {size_text!r}") from None
                self._buffer = self._buffer[end + 2 :]
                self._state = "chunk" if self._remaining else "trailer"
            elif self._state == "chunk":
                if len(self._buffer) < self._remaining + 2:
                    return pieces
                pieces.append(self._buffer[: self._remaining])
                self._buffer = self._buffer[self._remaining + 2 :]
                self._state = "size"
            else:  # trailer: we send no TE: trailers, so only the blank line
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return pieces
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if not line:
                    self.done = True
        return pieces

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                self.keep_alive = b"close" not in value.lower()
        if chunked:
            self._state = "size"
        elif length is not None:
            self._state = "length"
            self._remaining = length
            if length == 0:
                self.done = True
        else:
            raise HTTPError("close-delimited answers are not used by any lane")


class Connection:
    """One keep-alive client connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.usable = True

    @classmethod
    async def open(cls, target: Target) -> Connection:
        return cls(await trio.open_tcp_stream(target.host, target.port))

    async def request(self, payload: bytes) -> tuple[int, int]:
        """Send one request, read its whole answer: (status, body bytes)."""
        await self.stream.send_all(payload)
        parser = ResponseParser()
        received = 0
        while not parser.done:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise HTTPError("the server closed the connection mid-answer")
            received += sum(len(piece) for piece in parser.feed(data))
        self.usable = parser.keep_alive
        return parser.status, received

    async def aclose(self) -> None:
        self.usable = False
        await trio.aclose_forcefully(self.stream)


_FAILURES = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    HTTPError,
    ValueError,
)


# ------------------------------------------------------------------------------------------- results


@dataclass
class LoadResult:
    """One timed run. Latencies in ms; ``gen_cpu`` in cores (CPU seconds of the generator / wall seconds)."""

    generator: str  # "wrk" or "builtin"
    requests: int  # completed with status 200
    errors: int
    seconds: float
    p50: float
    p90: float
    p99: float
    max: float
    gen_cpu: float
    offered_rate: float | None = None  # open loop only
    lag_p99: float | None = None  # open loop: how late the generator started requests (ms, p99)
    sample: list[float] = field(default_factory=list)  # up to 2,000 latencies for plots (built-in only)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data["rps"] = self.rps
        return data


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted data (NaN when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _summarise(
    generator: str, latencies: list[float], errors: int, seconds: float, cpu: float, **extra: object
) -> LoadResult:
    ordered = sorted(latencies)
    step = max(1, len(ordered) // 2000)
    return LoadResult(
        generator=generator,
        requests=len(ordered),
        errors=errors,
        seconds=seconds,
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        max=ordered[-1] if ordered else math.nan,
        gen_cpu=cpu / seconds if seconds else 0.0,
        sample=ordered[::step],
        **extra,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------- closed loop


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str | None:
    path = wrk_path()
    if path is None:
        return None
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer" -> "debian/4.1.0-3+b2 [epoll]"
    return " ".join((done.stdout or done.stderr).split()[1:3])


_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def write_wrk_script(directory: Path, target: Target, body: bytes) -> Path:
    """A wrk Lua script that POSTs ``body`` with the target's headers and prints one ``RESULT {json}`` line.

    No ``response()`` callback: it slows wrk down. wrk counts statuses >= 400 as errors by itself.
    """
    if b"]==]" in body:
        raise ValueError("the body cannot be quoted for Lua")
    headers = [("Content-Type", "application/json"), *target.headers]
    lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in headers)
    path = directory / f"post-{abs(hash((target, body)))}.lua"
    path.write_text(_WRK_SCRIPT.format(body=body.decode(), headers=lines))
    return path


def run_wrk(target: Target, script: Path, concurrency: int, duration: float, cpu: int | None) -> LoadResult:
    """One wrk run (blocking). ``cpu`` pins wrk with taskset."""
    wrk = wrk_path()
    assert wrk is not None
    seconds = max(1, round(duration))
    command = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        target.url,
    ]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {done.stdout[-500:]} {done.stderr[-500:]}")
    raw = json.loads(line[len("RESULT ") :])
    wall = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    cpu_used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return LoadResult(
        generator="wrk",
        requests=max(0, raw["requests"] - raw["status"]),
        errors=errors,
        seconds=wall,
        p50=raw["p50_us"] / 1000,
        p90=raw["p90_us"] / 1000,
        p99=raw["p99_us"] / 1000,
        max=raw["max_us"] / 1000,
        gen_cpu=cpu_used / wall if wall else 0.0,
    )


async def closed_loop_builtin(target: Target, body: bytes, concurrency: int, duration: float) -> LoadResult:
    payload = target.request_bytes(body)
    latencies: list[float] = []
    errors = 0

    async def worker(deadline: float) -> None:
        nonlocal errors
        connection: Connection | None = None
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        if connection is None:
                            connection = await Connection.open(target)
                        status, _ = await connection.request(payload)
                except _FAILURES:
                    errors += 1
                    if connection is not None:
                        await connection.aclose()
                        connection = None
                    continue
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1
                if not connection.usable:
                    await connection.aclose()
                    connection = None
        finally:
            if connection is not None:
                await connection.aclose()

    cpu0 = time.process_time()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, start + duration)
    seconds = time.perf_counter() - start
    return _summarise("builtin", latencies, errors, seconds, time.process_time() - cpu0)


# ----------------------------------------------------------------------------------------- open loop


class OpenLoop:
    """Constant-arrival-rate load against one target; keeps its idle connections between runs (a ladder of
    rates reuses them, so a step does not pay for connection setup)."""

    def __init__(self, target: Target, body: bytes, *, max_connections: int = 1024) -> None:
        self._target = target
        self._payload = target.request_bytes(body)
        self._idle: list[Connection] = []
        self._slots = trio.Semaphore(max_connections)

    async def run(self, rate: float, duration: float) -> LoadResult:
        latencies: list[float] = []
        lags: list[float] = []
        errors = 0
        total = max(1, int(rate * duration))

        async def one(scheduled: float) -> None:
            nonlocal errors
            async with self._slots:
                connection = self._idle.pop() if self._idle else None
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        if connection is None:
                            connection = await Connection.open(self._target)
                        status, _ = await connection.request(self._payload)
                except _FAILURES:
                    errors += 1
                    if connection is not None:
                        await connection.aclose()
                    return
                if status == 200:
                    latencies.append((time.perf_counter() - scheduled) * 1000)
                else:
                    errors += 1
                if connection.usable:
                    self._idle.append(connection)
                else:
                    await connection.aclose()

        cpu0 = time.process_time()
        start = time.perf_counter() + 0.01
        async with trio.open_nursery() as nursery:
            index = 0
            while index < total:
                due = start + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
                now = time.perf_counter()
                # Launch every request that is due (a late wake-up launches several at once).
                while index < total and start + index / rate <= now:
                    scheduled = start + index / rate
                    lags.append((now - scheduled) * 1000)
                    nursery.start_soon(one, scheduled)
                    index += 1
        seconds = time.perf_counter() - start
        lags.sort()
        return _summarise(
            "builtin",
            latencies,
            errors,
            seconds,
            time.process_time() - cpu0,
            offered_rate=rate,
            lag_p99=percentile(lags, 99),
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()


# ------------------------------------------------------------------------------------------- streams


@dataclass
class StreamSample:
    """One streamed answer, timed on the client. Times in ms from the moment the request was sent."""

    ok: bool
    ttfb: float = math.nan  # first byte of the response head
    first_token: float = math.nan  # first event with non-empty content
    total: float = math.nan
    token_times: list[float] = field(default_factory=list)
    reads: int = 0  # socket reads that carried at least one event
    events: int = 0
    error: str | None = None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


async def stream_once(connection: Connection, payload: bytes) -> StreamSample:
    """Send one streaming request on ``connection`` and time its events."""
    sent = time.perf_counter()
    await connection.stream.send_all(payload)
    parser = ResponseParser()
    sample = StreamSample(ok=False)
    pending = b""
    done = False
    while not parser.done:
        data = await connection.stream.receive_some(RECEIVE_SIZE)
        now = (time.perf_counter() - sent) * 1000
        if not data:
            raise HTTPError("the server closed the stream")
        if math.isnan(sample.ttfb):
            sample.ttfb = now
        pending += b"".join(parser.feed(data))
        *events, pending = pending.split(b"\n\n")
        if events:
            sample.reads += 1
        for event in events:
            sample.events += 1
            if event.startswith(b"data: [DONE]"):
                done = True
            elif b'"content":"' in event and b'"content":""' not in event:
                sample.token_times.append(now)
    sample.total = (time.perf_counter() - sent) * 1000
    connection.usable = parser.keep_alive
    if sample.token_times:
        sample.first_token = sample.token_times[0]
    sample.ok = parser.status == 200 and done
    if not sample.ok:
        sample.error = f"status {parser.status}, [DONE] {'seen' if done else 'missing'}"
    return sample


# ---------------------------------------------------------------------------------- idle connections


async def open_idle_connections(
    target: Target, body: bytes, count: int, *, parallel: int = 32
) -> list[Connection]:
    """Open ``count`` keep-alive connections, one request on each (``parallel`` at a time); returns them open."""
    payload = target.request_bytes(body)
    opened: list[Connection] = []
    limiter = trio.Semaphore(parallel)

    async def one() -> None:
        async with limiter:
            with trio.fail_after(REQUEST_TIMEOUT):
                connection = await Connection.open(target)
                opened.append(connection)
                status, _ = await connection.request(payload)
            if status != 200:
                raise HTTPError(f"status {status}")

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return opened


def still_open(connections: Sequence[Connection]) -> int:
    """How many of the connections the server has not closed (a non-blocking peek on each)."""
    alive = 0
    for connection in connections:
        fd = connection.stream.socket.fileno()
        probe = socket.socket(fileno=os.dup(fd))
        try:
            alive += probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive += 1  # nothing to read and no EOF: open
        except OSError:
            pass
        finally:
            probe.close()
    return alive
