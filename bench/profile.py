"""``python -m bench.profile``: where trioproxy's CPU goes, sampled under load.

It starts the bench's upstreams and a provisioned trioproxy (one process, pinned to CPU 1, as the ``trioproxy-1``
lane), drives the small chat completion with wrk (or the built-in generator) at a fixed concurrency, samples
the proxy with py-spy (``pip install py-spy``) for the duration, and prints the flattest useful summary: the
share of samples per bucket (h11, trio, sockets, SQLAlchemy, our own modules, ...) and the top functions by
own time. ``--raw FILE`` keeps py-spy's collapsed stacks for a flame graph.

    python -m bench.profile --seconds 10 --concurrency 16
    python -m bench.profile --scenario stream --concurrency 64
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import trio

from bench import lanes, loadgen
from bench import upstreams as upstreams_mod
from bench.scenarios import body_for

# Buckets by the file of the innermost frame; first match wins. Order: most specific first.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("h11 (not on the hot path any more)", ("(h11/",)),
    ("trio runtime (scheduler, cancel scopes, epoll)", ("(trio/", "(outcome/")),
    ("sqlalchemy + sqlite3 (metering writer thread)", ("(sqlalchemy/", "sqlite3", "trioproxy/store/")),
    ("json / orjson", ("(json/", "orjson")),
    (
        "HTTP layer: server, head parser, framing, sockets",
        (
            "trioproxy/server.py",
            "trioproxy/exchange.py",
            "request_guard",
            "trioproxy/http1.py",
            "trioproxy/sockets.py",
        ),
    ),
    ("upstream pool and connections", ("trioproxy/pool.py", "trioproxy/upstream_conn.py")),
    (
        "auth, routes, header policy",
        ("gateway_keys.py", "trioproxy/routes.py", "trioproxy/headers.py", "dialects.py"),
    ),
    ("forwarder and relay (attempts, records)", ("trioproxy/forward.py", "trioproxy/relay.py", "records.py")),
    (
        "usage metering (SSE, JSON)",
        ("trioproxy/usage.py", "trioproxy/sse.py", "openai_stream", "first_event"),
    ),
    ("balancer and limits", ("trioproxy/balancer/", "trioproxy/limits/")),
    ("metrics, metering queue, pricing", ("metering.py", "metrics.py", "spool.py", "pricing.py")),
    ("trioproxy: other", ("trioproxy/",)),
    (
        "python stdlib (contextlib, uuid, threading, ...)",
        (
            "(contextlib",
            "(uuid",
            "(enum",
            "(socket",
            "(selectors",
            "(threading",
            "(abc",
            "(<",
            "(typing",
            "(dataclasses",
            "(urllib",
            "(re/",
            "(ipaddress",
            "(datetime",
            "(decimal",
            "(functools",
            "(collections",
        ),
    ),
)


def _bucket(frame: str) -> str:
    for name, needles in BUCKETS:
        if any(needle in frame for needle in needles):
            return name
    return "other"


def summarise(collapsed: str, top: int = 25) -> str:
    """Shares per bucket and the top own-time functions, from py-spy's collapsed output."""
    buckets: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1])  # by function, not by line
        total += count
        buckets[_bucket(leaf)] += count
        functions[leaf] += count
    if total == 0:
        return "no samples"
    lines = [f"{total} samples", "", "| bucket (innermost frame) | share |", "|---|---|"]
    lines += [f"| {name} | {100.0 * n / total:.1f}% |" for name, n in buckets.most_common()]
    lines += ["", "| function (own time) | share |", "|---|---|"]
    lines += [f"| `{name}` | {100.0 * n / total:.1f}% |" for name, n in functions.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--scenario", choices=("small", "large", "stream"), default="small")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="trioproxy-profile-") as tmp:
        workdir = Path(tmp)
        upstreams = upstreams_mod.start_upstreams(workdir, cpu=0)
        try:
            keys = lanes.provision_trioproxy(workdir / "data", upstreams)
            lane = lanes.trioproxy_lane(workdir, workdir / "data", keys, None, "1")
            try:
                target = lane.targets[args.scenario]
                body = body_for(lane, args.scenario)
                # Warm up (imports, pools, snapshot) before sampling.
                trio.run(loadgen.closed_loop_builtin, target, body, 4, 2.0)
                out = workdir / "profile.txt"
                command = [py_spy, "record", "--format", "raw", "--rate", str(args.rate), "-o", str(out)]
                # --gil: only the thread holding the GIL is sampled, so idle worker threads do not count.
                command += [
                    "--gil",
                    "--duration",
                    str(round(args.seconds)),
                    "--pid",
                    str(lane.processes[0].pid),
                ]
                if args.native:
                    command.append("--native")
                sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                result = _drive(target, body, args, workdir)
                sampler.wait(timeout=args.seconds + 60)
                print(f"load: {result.rps:,.0f} rps at c={args.concurrency} (under sampling)")
                collapsed = out.read_text() if out.exists() else ""
                if args.raw is not None:
                    args.raw.write_text(collapsed)
                print(summarise(collapsed))
            finally:
                lane.stop()
        finally:
            upstreams.stop()
    return 0


def _drive(
    target: loadgen.Target, body: bytes, args: argparse.Namespace, workdir: Path
) -> loadgen.LoadResult:
    if args.scenario != "stream" and loadgen.wrk_path() is not None:
        script = loadgen.write_wrk_script(workdir, target, body)
        return loadgen.run_wrk(target, script, args.concurrency, args.seconds, 0)
    results: list[loadgen.LoadResult] = []
    thread = threading.Thread(
        target=lambda: results.append(
            trio.run(loadgen.closed_loop_builtin, target, body, args.concurrency, args.seconds)
        )
    )
    thread.start()
    thread.join()
    return results[0]


if __name__ == "__main__":
    sys.exit(main())
