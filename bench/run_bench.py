"""Throughput and added latency: straight to the fake upstream versus through trioproxy, in one interleaved run.

Usage::

    .venv/bin/python -m bench.run_bench [--duration 10] [--rounds 3] [--concurrency 1,64] [--events 20]

It starts the fake upstream (``python -m trioproxy.testing.fake_upstream``) and a real ``trioproxy serve`` process
on a temporary SQLite data directory, provisions them with the CLI, then alternates direct and proxied runs for
each scenario (non-streamed chat completion; SSE stream of ``--events`` chunks) and prints a Markdown table of
medians over the rounds with the proxied/direct ratios. Processes are pinned with ``taskset`` when it exists:
the gateway on CPU 1, the fake upstream and the load generator on CPU 0 (the method of docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from bench.loadgen import LoadResult, run_load

SECRET = "sk-upstream-bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def _pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    data_dir = Path(tempfile.mkdtemp(prefix="trioproxy-bench-"))
    fake_port, proxy_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "TRIOPROXY_DATA_DIR": str(data_dir),
        "TRIOPROXY_PROXY_HOST": "127.0.0.1",
        "TRIOPROXY_PROXY_PORT": str(proxy_port),
        "TRIOPROXY_ALLOW_PRIVATE_UPSTREAMS": "true",
        "TRIOPROXY_LOG_LEVEL": "WARNING",
    }
    env.pop("TRIOPROXY_DATABASE_URL", None)
    fake = subprocess.Popen(
        [
            *_pinned(0),
            sys.executable,
            "-m",
            "trioproxy.testing.fake_upstream",
            "--port",
            str(fake_port),
            "--events",
            str(args.events),
            "--accept-key",
            SECRET,
        ],
        stdout=subprocess.DEVNULL,
    )
    gateway: subprocess.Popen[bytes] | None = None
    try:
        _wait_port(fake_port)

        def cli(*cli_args: str, stdin: str | None = None) -> dict[str, object]:
            out = subprocess.run(
                [sys.executable, "-m", "trioproxy", *cli_args],
                env=env,
                input=stdin,
                text=True,
                capture_output=True,
                check=True,
            ).stdout
            result: dict[str, object] = json.loads(out)
            return result

        cli("provider", "add", "fake", "--kind", "openai", "--base-url", f"http://127.0.0.1:{fake_port}")
        cli("provider-key", "add", "--provider", "fake", "--name", "k1", "--secret", "-", stdin=SECRET)
        key = str(cli("key", "create", "--name", "bench", "--provider", "fake")["key"])
        gateway = subprocess.Popen(
            [*_pinned(1), sys.executable, "-m", "trioproxy", "serve"], env=env, stdout=subprocess.DEVNULL
        )
        _wait_port(proxy_port)
        # The load generator shares CPU 0 with the fake upstream.
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {0})

        scenarios: dict[str, dict[str, object]] = {
            "chat, non-stream": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            f"chat, SSE ({args.events} events)": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
        }
        targets = {
            "direct": (f"http://127.0.0.1:{fake_port}/v1/chat/completions", SECRET),
            "trioproxy": (f"http://127.0.0.1:{proxy_port}/v1/chat/completions", key),
        }
        rows = []
        for name, body in scenarios.items():
            payload = json.dumps(body).encode()
            expect = b"[DONE]" if body.get("stream") else b"usage"
            for concurrency in levels:
                results: dict[str, list[LoadResult]] = {t: [] for t in targets}
                for round_index in range(args.rounds):
                    order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
                    for target in order:
                        url, auth = targets[target]
                        headers = [("authorization", f"Bearer {auth}"), ("content-type", "application/json")]
                        load = partial(
                            run_load,
                            url,
                            headers=headers,
                            body=payload,
                            concurrency=concurrency,
                            duration=args.duration,
                            expect=expect,
                        )
                        results[target].append(trio.run(load))
                rows.append((name, concurrency, results))
        print(_report(rows, args))
    finally:
        for process in (gateway, fake):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


def _report(rows: list[tuple[str, int, dict[str, list[LoadResult]]]], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.rounds} interleaved rounds x {args.duration:g} s, medians.",
        "",
        "| scenario | c | direct rps | trioproxy rps | rps ratio | direct p50 ms | trioproxy p50 ms | added p50 ms"
        " | direct p99 ms | trioproxy p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, concurrency, results in rows:
        direct, proxied = results["direct"], results["trioproxy"]
        d_rps = statistics.median(r.rps for r in direct)
        p_rps = statistics.median(r.rps for r in proxied)
        d50 = statistics.median(r.median_ms for r in direct)
        p50 = statistics.median(r.median_ms for r in proxied)
        d99 = statistics.median(r.percentile(99) for r in direct)
        p99 = statistics.median(r.percentile(99) for r in proxied)
        errors = sum(r.errors for r in direct + proxied)
        lines.append(
            f"| {name} | {concurrency} | {d_rps:,.0f} | {p_rps:,.0f} | {p_rps / d_rps:.2f} | {d50:.2f} | {p50:.2f} "
            f"| {p50 - d50:+.2f} | {d99:.2f} | {p99:.2f} | {errors} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
