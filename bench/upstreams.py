"""The fake upstreams every lane talks to: fixed JSON answers and a paced SSE stream.

- **JSON (small and 10 KB answers):** nginx serving fixed responses when ``nginx`` is installed (one worker,
  ``return 200 '...'``, as in perf-anchors.md §1.1: it is ~10x faster than any proxy measured, so it is not the
  bottleneck), else the project's fake (``python -m trioproxy.testing.fake_upstream``), one process per answer
  size. Both serve the *same bytes*: the nginx bodies are rendered by the fake's own payload builders.
- **SSE:** always the project's fake with ``--events 64 --chunk-delay 0.02`` (nginx cannot pace events).

Every upstream runs pinned to CPU 0 (with the load generator), so the proxy under test has CPU 1 to itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.lanes import Process, free_port, pinned, start_process
from trioproxy.testing.fake_openai import openai_chat
from trioproxy.testing.fake_payloads import Call, FakeUsage, answer_pieces

UPSTREAM_KEY = "sk-upstream-bench"
STREAM_EVENTS = 64
STREAM_DELAY = 0.020
SMALL_EVENTS = 5  # "Hello from the fake upstream": a ~600-byte chat.completion, like perf-anchors' mock
LARGE_ANSWER_BYTES = 10 * 1024


def _events_for(answer_bytes: int) -> int:
    events = 1
    while len("".join(answer_pieces(events))) < answer_bytes:
        events += 64
    while len("".join(answer_pieces(events))) > answer_bytes:
        events -= 1
    return events


LARGE_EVENTS = _events_for(LARGE_ANSWER_BYTES)


def chat_body(events: int, model: str = "gpt-4o-mini") -> bytes:
    """The chat.completion JSON the fake upstream answers with ``events`` words (usage included)."""
    call = Call(seq=1, now=int(time.time()), pieces=answer_pieces(events), usage=FakeUsage())
    return openai_chat(call, {"model": model}, model).body


@dataclass
class Upstreams:
    """Where the upstreams listen; ``kind`` says which server answers JSON ("nginx" or "fake")."""

    kind: str
    host: str
    json_port: int  # small answers at /v1/chat/completions ...
    large_port: int  # ... 10 KB answers at {large_prefix}/v1/chat/completions
    large_prefix: str
    stream_port: int
    version: str
    processes: list[Process] = field(default_factory=list)

    def base_url(self, scenario: str) -> str:
        if scenario == "stream":
            return f"http://{self.host}:{self.stream_port}"
        if scenario == "large":
            return f"http://{self.host}:{self.large_port}{self.large_prefix}"
        return f"http://{self.host}:{self.json_port}"

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def nginx_version() -> str | None:
    path = nginx_path()
    if path is None:
        return None
    done = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ").removeprefix("nginx/")


_NGINX_MOCK = """\
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx-mock.pid;
error_log {workdir}/nginx-mock.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/mock-body;
    proxy_temp_path {workdir}/mock-proxy;
    fastcgi_temp_path {workdir}/mock-fastcgi;
    uwsgi_temp_path {workdir}/mock-uwsgi;
    scgi_temp_path {workdir}/mock-scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /v1/chat/completions {{ default_type application/json; return 200 '{small}'; }}
        # nginx.conf parameters are limited to 4 KiB, so the 10 KB answer is a file. A POST to a static file is
        # refused (405); error_page turns that into an internal GET of the file, answered 200.
        location = {large_prefix}/v1/chat/completions {{ error_page 405 =200 /large.json; return 405; }}
        location = /large.json {{ internal; root {workdir}; default_type application/json; }}
    }}
}}
"""


def _nginx_safe(body: bytes) -> str:
    text = body.decode()
    if "'" in text or "$" in text or "\\" in text:
        raise ValueError("the fixed answer cannot be quoted in nginx.conf")
    return text


def start_upstreams(workdir: Path, *, cpu: int | None, prefer_nginx: bool = True) -> Upstreams:
    """Start the JSON upstream (nginx or the fake) and the SSE fake, pinned to ``cpu``; wait until they answer."""
    host = "127.0.0.1"
    processes: list[Process] = []
    try:
        stream_port = free_port()
        processes.append(
            start_process(
                "fake-sse",
                [
                    *pinned(cpu),
                    sys.executable,
                    "-m",
                    "trioproxy.testing.fake_upstream",
                    "--port",
                    str(stream_port),
                    "--events",
                    str(STREAM_EVENTS),
                    "--chunk-delay",
                    str(STREAM_DELAY),
                    "--key",
                    UPSTREAM_KEY,
                ],
                workdir,
                wait_port=stream_port,
            )
        )
        nginx = nginx_path() if prefer_nginx else None
        if nginx is not None:
            port = free_port()
            (workdir / "large.json").write_bytes(chat_body(LARGE_EVENTS))
            # nginx started as root serves files as "nobody": the (mkdtemp, 0700) directory must be readable.
            workdir.chmod(0o755)
            (workdir / "large.json").chmod(0o644)
            conf = workdir / "nginx-mock.conf"
            conf.write_text(
                _NGINX_MOCK.format(
                    workdir=workdir,
                    port=port,
                    small=_nginx_safe(chat_body(SMALL_EVENTS)),
                    large_prefix="/large",
                )
            )
            processes.append(
                start_process(
                    "nginx-mock",
                    [*pinned(cpu), nginx, "-c", str(conf), "-p", str(workdir)],
                    workdir,
                    wait_port=port,
                )
            )
            return Upstreams(
                "nginx", host, port, port, "/large", stream_port, f"nginx {nginx_version()}", processes
            )
        ports = []
        for name, events in (("fake-small", SMALL_EVENTS), ("fake-large", LARGE_EVENTS)):
            port = free_port()
            ports.append(port)
            command = [
                *pinned(cpu),
                sys.executable,
                "-m",
                "trioproxy.testing.fake_upstream",
                "--port",
                str(port),
                "--events",
                str(events),
                "--key",
                UPSTREAM_KEY,
            ]
            processes.append(start_process(name, command, workdir, wait_port=port))
        return Upstreams(
            "fake", host, ports[0], ports[1], "", stream_port, "trioproxy.testing.fake_upstream", processes
        )
    except BaseException:
        for process in processes:
            process.stop()
        raise
