"""`trioproxy serve --workers N`: the real supervisor and worker processes, on real sockets.

Which worker served a connection is read from the kernel: the server side of a TCP connection is a socket inode in
/proc/net/tcp, and the process that owns that inode has it among its /proc/PID/fd links.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.integration.harness import UPSTREAM_SECRET
from trioproxy.records import RequestRecord
from trioproxy.spool import Spool
from trioproxy.store.db import create_engine_for
from trioproxy.store.request_log import recent_requests
from trioproxy.testing.fake_upstream import FakeUpstream

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


def _env(data_dir: Path, port: int = 0) -> dict[str, str]:
    env = {
        **os.environ,
        "TRIOPROXY_DATA_DIR": str(data_dir),
        "TRIOPROXY_PROXY_HOST": "127.0.0.1",
        "TRIOPROXY_PROXY_PORT": str(port),
        "TRIOPROXY_ADMIN_PORT": "0",
        "TRIOPROXY_ADMIN_PASSWORD": "correct horse battery staple 42",
        "TRIOPROXY_ALLOW_PRIVATE_UPSTREAMS": "true",
        "TRIOPROXY_LOG_LEVEL": "WARNING",
        "TRIOPROXY_DRAIN_TIMEOUT": "5",
    }
    env.pop("TRIOPROXY_DATABASE_URL", None)
    env.pop("TRIOPROXY_WORKER_INDEX", None)
    return env


def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> object:
    done = subprocess.run(
        [sys.executable, "-m", "trioproxy", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def _tcp_sockets(port: int) -> list[tuple[str, int, int]]:
    """(state, remote port, inode) of every IPv4 socket whose local port is ``port``."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port:
            found.append((fields[3], int(fields[2].split(":")[1], 16), int(fields[9])))
    return found


def _owner(inode: int, pids: list[int]) -> int | None:
    wanted = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == wanted:
                    return pid
            except OSError:
                continue
    return None


async def _read_line(process: trio.Process, pending: bytearray) -> str:
    assert process.stdout is not None
    with trio.fail_after(30):
        while b"\n" not in pending:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"the supervisor closed its stdout; got {bytes(pending)!r}")
            pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line.decode()


async def _post_on(stream: trio.SocketStream, key: str) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(CHAT)}\r\n\r\n"
    ).encode()
    await stream.send_all(head + CHAT)
    received = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(65536)
        head_part, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head_part.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
    assert head_part.startswith(b"HTTP/1.1 200 "), head_part
    return body


async def _served_by(port: int, key: str, connections: int, pids: list[int]) -> list[int | None]:
    """Open ``connections`` connections, one request on each, and say which worker pid holds each one."""
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(connections)]
    try:
        for stream in streams:
            assert b'"usage"' in await _post_on(stream, key)
        sockets = {remote: inode for state, remote, inode in _tcp_sockets(port) if state == TCP_ESTABLISHED}
        return [_owner(sockets[stream.socket.getsockname()[1]], pids) for stream in streams]
    finally:
        for stream in streams:
            await stream.aclose()


async def _rows(data_dir: Path, at_least: int) -> list[dict[str, object]]:
    """The request rows, once there are ``at_least`` of them (the metering writers flush every 0.2 s)."""
    engine = create_engine_for(f"sqlite:///{data_dir / 'trioproxy.db'}")
    try:
        with trio.fail_after(10):
            while True:
                rows = await trio.to_thread.run_sync(recent_requests, engine, 1000)
                if len(rows) >= at_least:
                    return rows
                await trio.sleep(0.1)
    finally:
        engine.dispose()


def _orphan_record() -> RequestRecord:
    return RequestRecord(
        request_id="orphan-from-a-single-process-run",
        started_at=time.time(),
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="127.0.0.1",
        status=200,
    )


async def test_two_workers_share_the_port_restart_and_flush_every_row(tmp_path: Path) -> None:
    env = _env(tmp_path)
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,))
    # A spool left by an earlier single-process run: no worker owns it, so the supervisor replays it.
    orphan = Spool(tmp_path / "metering.spool")
    orphan.open()
    orphan.append([_orphan_record()])
    orphan.sync()
    orphan.close()
    async with trio.open_nursery() as nursery:
        fake_port = await nursery.start(fake.serve)
        base = f"http://127.0.0.1:{fake_port}"
        await trio.to_thread.run_sync(
            lambda: _cli(env, "provider", "add", "oa", "--kind", "openai", "--base-url", base)
        )
        await trio.to_thread.run_sync(
            lambda: _cli(
                env,
                "provider-key",
                "add",
                "--provider",
                "oa",
                "--name",
                "k",
                "--secret",
                "-",
                stdin=UPSTREAM_SECRET,
            )
        )
        created = await trio.to_thread.run_sync(
            lambda: _cli(env, "key", "create", "--name", "w", "--provider", "oa")
        )
        assert isinstance(created, dict)
        key = str(created["key"])

        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioproxy", "serve", "--workers", "2"], env=env, stdout=subprocess.PIPE
        )
        pending = bytearray()
        try:
            pids: dict[int, int] = {}
            while True:
                line = await _read_line(process, pending)
                if line.startswith("trioproxy: proxy listening on "):
                    port = int(line.rsplit(":", 1)[1])
                    break
                if not line.startswith("trioproxy: worker "):
                    continue  # the admin line of worker 0, "2 workers ready"
                # trioproxy: worker I (pid P) listening on HOST:PORT
                words = line.split()
                pids[int(words[2])] = int(words[4].rstrip(")"))
            assert sorted(pids) == [0, 1]

            # Two listening sockets on one port, one in each worker: SO_REUSEPORT, not one inherited socket.
            listeners = [inode for state, _, inode in _tcp_sockets(port) if state == TCP_LISTEN]
            assert sorted(_owner(inode, list(pids.values())) or 0 for inode in listeners) == sorted(
                pids.values()
            )

            # The kernel hashes connections over both: 24 connections all on one worker has odds of 2**-23.
            served = await _served_by(port, key, 24, list(pids.values()))
            assert set(served) == set(pids.values())

            # Wait for the 24 rows (and the replayed orphan) to be committed: a SIGKILLed worker loses what it
            # holds in memory (metering.py's documented crash window), and this test counts every row.
            await _rows(tmp_path, 25)

            # A worker that dies is replaced, and the port keeps answering meanwhile.
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            line = await _read_line(process, pending)
            if line.startswith("trioproxy: admin listening on "):
                line = await _read_line(process, pending)  # the new worker 0 runs the admin plane again
            assert line.startswith("trioproxy: worker 0 (pid "), line
            new_pid = int(line.split()[4].rstrip(")"))
            assert new_pid != victim
            served_after = await _served_by(port, key, 8, [new_pid, pids[1]])
            assert None not in served_after

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert returncode == 0
        nursery.cancel_scope.cancel()
    rows = await _rows(tmp_path, 33)
    ids = [row["request_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 33  # 24 + 8 requests and the orphan, each exactly once
    assert "orphan-from-a-single-process-run" in ids
    assert all(row["outcome"] == "ok" and row["status"] == 200 for row in rows)
    # Every worker's spool is empty: what they held at SIGTERM reached the database, not the disk.
    for index in (0, 1):
        spool = tmp_path / f"metering-{index}.spool"
        assert spool.exists() and spool.stat().st_size == 0
    assert (tmp_path / "metering.spool").stat().st_size == 0


def test_a_port_taken_by_another_program_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "trioproxy", "serve", "--workers", "2"],
            env=_env(tmp_path, port),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["type"] == "WorkersFailed"
    assert str(port) in error["message"]


def test_a_worker_that_cannot_start_fails_the_whole_start(tmp_path: Path) -> None:
    # Another gateway on the same data directory holds worker 0's spool: worker 0 exits before it is ready.
    taken = Spool(tmp_path / "metering-0.spool")
    taken.open()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trioproxy", "serve", "--workers", "2"],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error == {"type": "WorkersFailed", "message": "worker 0 exited with status 1 before it was ready"}
    assert "workers ready" not in done.stdout
