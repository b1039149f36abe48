"""``python -m bench``: trioproxy against its upstream and its peers, side by side, in one run.

Usage::

    python -m bench --quick                      # every scenario, short runs (a few minutes)
    python -m bench --full                       # the figures for docs/BENCHMARKS.md (about 40 minutes)
    python -m bench --quick --scenario small --lanes direct,trioproxy-1   # rerun one scenario on two lanes

It starts everything it needs in a temporary directory (upstreams, lanes, a provisioned trioproxy on SQLite),
pins processes as perf-anchors.md does (load generator and upstreams on CPU 0, the proxy under test on CPU 1;
the multi-worker lane on every core), runs the scenarios (bench/scenarios.py), stops every process it started,
and then:

- merges this run's scenarios into ``docs/bench/results.json`` (a rerun of one scenario replaces only that one;
  every scenario keeps its own date, mode and command line),
- rewrites the generated section of ``docs/BENCHMARKS.md`` and the PNG plots under ``docs/bench/``,
- prints the same tables on stdout.

``--no-write`` only prints. Lanes: ``direct``, ``trioproxy-1``, ``trioproxy-bare`` (the same forwarder without the gateway:
bench/bare.py), ``trioproxy-workers``, ``litellm-workers`` (``--num_workers N``) (``--workers N``, default
one per core), ``nginx`` (when installed), ``litellm`` (when installed); a missing one is reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench import lanes as lanes_mod
from bench import loadgen, report, upstreams
from bench.scenarios import FULL, QUICK, SCENARIOS, Runner

ROOT = Path(__file__).resolve().parent.parent
LANE_CHOICES = (
    "direct",
    "nginx",
    "trioproxy-1",
    "trioproxy-bare",
    "trioproxy-workers",
    "litellm",
    "litellm-workers",
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short runs (the default)")
    mode.add_argument("--full", action="store_true", help="10 s runs, full sweeps, a 5-minute soak")
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)"
    )
    parser.add_argument(
        "--lanes", default=",".join(LANE_CHOICES), help=f"comma-separated subset of {', '.join(LANE_CHOICES)}"
    )
    parser.add_argument(
        "--workers", type=int, default=lanes_mod.cpu_count(), help="workers of the multi-worker lane"
    )
    parser.add_argument(
        "--no-wrk", action="store_true", help="use the built-in generator even when wrk is installed"
    )
    parser.add_argument(
        "--fake-upstream", action="store_true", help="use the project's fake even when nginx is installed"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: regenerate docs/BENCHMARKS.md and the plots from docs/bench/results.json",
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lane_names = [name.strip() for name in args.lanes.split(",") if name.strip()]
    unknown = set(args.lane_names) - set(LANE_CHOICES)
    if unknown:
        parser.error(f"unknown lanes: {', '.join(sorted(unknown))}")
    return args


def _read(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return (
                    line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1].strip().strip('"')
                )
    except OSError:
        pass
    return "?"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine(args: argparse.Namespace, upstream_kind: str, gen: str) -> dict[str, Any]:
    mem_kb = _read("/proc/meminfo", "MemTotal").split()[0]
    nproc = os.cpu_count() or 1
    pinning = (
        "load generator (this process and wrk) and upstreams on CPU 0 (`taskset -c 0`); trioproxy-1, nginx and "
        "LiteLLM on CPU 1 (`taskset -c 1`); the multi-worker lane on every CPU (it cannot be kept apart from the "
        "load generator on this machine); the direct lane's upstream moves to CPU 1 for its own runs, so every "
        "lane's requests cross the same two cores"
        if lanes_mod.can_pin()
        else "none (one CPU, or no taskset)"
    )
    versions = {
        "CPython": platform.python_version(),
        "trio": _version("trio"),
        "h11": _version("h11"),
        "trioproxy": _version("trioproxy"),
        "nginx": upstreams.nginx_version() or "not installed",
        "wrk": loadgen.wrk_version() or "not installed",
        "LiteLLM": "installed" if lanes_mod.litellm_path() else "not installed",
        "matplotlib": _version("matplotlib"),
    }
    return {
        "nproc": nproc,
        "cpu_model": _read("/proc/cpuinfo", "model name"),
        "memory_gb": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb.isdigit() else "?",
        "os": _read("/etc/os-release", "PRETTY_NAME"),
        "kernel": platform.release(),
        "versions": versions,
        "pinning": pinning,
        "upstream": upstream_kind,
        "generator": gen,
    }


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def _restore_nan(value: Any) -> Any:
    # JSON has no NaN: missing figures are stored as null and read back as NaN for the formatters.
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {
            k: (
                _restore_nan(v)
                if k not in ("skipped", "error", "command", "version", "offered_rate", "lag_p99")
                else v
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.report_only:
        return _write_report(
            args.docs, _restore_nan(json.loads((args.docs / "bench" / "results.json").read_text()))
        )
    mode = FULL if args.full else QUICK
    chosen = args.scenario or list(SCENARIOS)
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    multi_cpu = lanes_mod.can_pin()
    gen_cpu, proxy_cpu = (0, "1") if multi_cpu else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="trioproxy-bench-"))
    started = time.monotonic()
    lanes: list[lanes_mod.Lane] = []
    ups: upstreams.Upstreams | None = None
    exits: dict[str, Any] = {}
    try:
        print(f"bench: {mode.name} mode, scenarios {', '.join(chosen)}; working in {workdir}", flush=True)
        ups = upstreams.start_upstreams(workdir, cpu=gen_cpu, prefer_nginx=not args.fake_upstream)
        upstream_kind = (
            (
                f"nginx {upstreams.nginx_version()} serving fixed JSON answers (1 worker; the 10 KB one from a file)"
                if ups.kind == "nginx"
                else "the project's fake (`python -m trioproxy.testing.fake_upstream`), nginx not installed"
            )
            + f"; SSE from the project's fake ({upstreams.STREAM_EVENTS} events, {upstreams.STREAM_DELAY * 1000:g} ms apart)"
        )
        for name in LANE_CHOICES:
            if name not in args.lane_names:
                continue
            if name == "direct":
                lanes.append(lanes_mod.direct_lane(ups))
            elif name == "nginx":
                lanes.append(lanes_mod.nginx_lane(workdir, ups, proxy_cpu))
            elif name == "litellm":
                lanes.append(lanes_mod.litellm_lane(workdir, ups, proxy_cpu))
            elif name == "litellm-workers":
                cpus = lanes_mod.all_cpus() if multi_cpu else None
                lanes.append(lanes_mod.litellm_lane(workdir, ups, cpus, workers=args.workers))
            elif name == "trioproxy-bare":
                lanes.append(lanes_mod.bare_lane(workdir, ups, proxy_cpu))
        if {"trioproxy-1", "trioproxy-workers"} & set(args.lane_names):
            data_dir = workdir / "trioproxy-data"
            keys = lanes_mod.provision_trioproxy(data_dir, ups)
            if "trioproxy-1" in args.lane_names:
                lanes.insert(
                    min(2, len(lanes)), lanes_mod.trioproxy_lane(workdir, data_dir, keys, None, proxy_cpu)
                )
            if "trioproxy-workers" in args.lane_names:
                cpus = lanes_mod.all_cpus() if multi_cpu else None
                lanes.insert(
                    min(3, len(lanes)), lanes_mod.trioproxy_lane(workdir, data_dir, keys, args.workers, cpus)
                )
        if gen_cpu is not None:
            os.sched_setaffinity(0, {gen_cpu})
        runner = Runner(
            mode,
            lanes,
            workdir,
            use_wrk=not args.no_wrk,
            gen_cpu=gen_cpu,
            proxy_cpu=int(proxy_cpu) if proxy_cpu is not None else None,
        )
        gen = (
            f"wrk ({loadgen.wrk_version()}) for closed loops, the built-in trio generator for open loops and streams"
            if runner.use_wrk
            else "the built-in trio generator (wrk not installed or --no-wrk)"
        )
        meta = machine(args, upstream_kind, gen)
        for lane in lanes:
            print(
                f"lane {lane.name}: {'skipped: ' + lane.skipped if lane.skipped else lane.description}",
                flush=True,
            )
        print("warming up", flush=True)
        runner.warm_up()
        fresh: dict[str, Any] = {}
        for scenario in chosen:
            print(f"scenario {scenario}", flush=True)
            data = {
                "small": lambda: runner.sweep("small"),
                "large": lambda: runner.sweep("large"),
                "rate": runner.rate,
                "stream": runner.stream,
                "idle": runner.idle,
                "soak": runner.soak,
            }[scenario]()
            fresh[scenario] = {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "mode": mode.name,
                "command": command,
                "data": data,
            }
    finally:
        for lane in lanes:
            if lane.name != "direct":
                exits.update(lane.stop())
        if ups is not None:
            ups.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for name, code in exits.items():
        if name.startswith("trioproxy") and code != 0:
            print(f"warning: {name} exited with status {code} on SIGTERM", flush=True)

    lane_info = {
        lane.name: {
            "description": lane.description,
            "version": lane.version,
            "command": lane.command,
            "skipped": lane.skipped,
        }
        for lane in lanes
    }
    results: dict[str, Any] = {"meta": meta, "lanes": lane_info, "scenarios": fresh}
    results_path = args.docs / "bench" / "results.json"
    if not args.no_write and results_path.exists():
        stored = _restore_nan(json.loads(results_path.read_text()))
        stored["meta"] = meta
        stored.setdefault("lanes", {}).update(lane_info)
        stored.setdefault("scenarios", {}).update(fresh)
        results = stored
    results = _restore_nan(_round(results))
    print()
    print(report.render({**results, "scenarios": fresh}))
    if not args.no_write:
        _write_report(args.docs, results)
    print(f"bench: done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


def _write_report(docs: Path, results: dict[str, Any]) -> int:
    try:
        plots = report.plot(results, docs / "bench")
    except ModuleNotFoundError as exc:  # matplotlib comes with the bench extra; the tables do not need it
        print(f"bench: no plots ({exc.name} is not installed: pip install -e '.[bench]')", flush=True)
        plots = []
    rel = [str(p.relative_to(docs)) for p in plots]
    report.write_section(docs / "BENCHMARKS.md", report.render(results, rel))
    results_path = docs / "bench" / "results.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(_round(results), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {docs / 'BENCHMARKS.md'}, {results_path} and {len(plots)} plots", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
