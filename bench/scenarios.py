"""The scenarios: what is measured on every lane, interleaved and repeated, and what each number means.

=========  =======================================================================================================
small      closed-loop sweep (c = 1, 16, 64, 256) of a small chat completion (~600-byte answer, 170-byte prompt)
large      closed-loop sweep of a 10 KB prompt and a 10 KB answer
rate       open loop: a ladder of constant arrival rates; the highest rate held with p99 < 5 ms, and < 50 ms,
           with zero errors and at least 95% of the offered rate completed
stream     SSE with 64 deltas 20 ms apart: time to first token, inter-token gaps (p50/p99) and coalesced events
           (gaps < 2 ms) at c=1; then a ladder of concurrent streams: the most held with no late token (a gap
           over 40 ms, twice the pacing) and no error; CPU per forwarded event
idle       1,000 idle keep-alive client connections: RSS per connection, and that they stay open
soak       a steady open-loop rate (5 min full, 30 s quick): RSS growth per minute, open fds back to baseline
=========  =======================================================================================================

Every run records the lane's CPU seconds (process tree, from /proc), per-CPU busy shares and the generator's
own CPU use. Repeated runs rotate the lane order each repetition, so drift hits every lane alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench import loadgen
from bench.lanes import (
    CLK_TCK,
    Lane,
    busy_shares,
    cpu_busy,
    cpu_seconds,
    memory,
    open_fds,
    process_role,
    process_tree,
    set_affinity,
)
from bench.loadgen import Connection, LoadResult, OpenLoop, Target

SCENARIOS = ("small", "large", "rate", "stream", "idle", "soak")
RATE_LADDER = (
    100,
    200,
    400,
    700,
    1000,
    1500,
    2000,
    2500,
    3000,
    4000,
    5000,
    6000,
    8000,
    10000,
    13000,
    16000,
    20000,
)
LATE_GAP_MS = 40.0  # twice the 20 ms pacing: a token this late was held back somewhere
COALESCED_GAP_MS = 2.0


@dataclass(frozen=True)
class Mode:
    name: str
    reps: int
    run_seconds: float
    sweep: tuple[int, ...]
    large_sweep: tuple[int, ...]
    rate_step_seconds: float
    rate_reps: int
    stream_c1: int  # sequential streams per lane per repetition at c=1
    stream_levels: tuple[int, ...]
    stream_rounds: int  # sequential streams per connection in a ladder step
    idle_connections: int
    idle_hold_seconds: float
    soak_seconds: float
    soak_rate: float
    soak_sample_seconds: float
    soak_all_trioproxy_lanes: bool
    soak_settle_seconds: float  # how long the fds may take to return to baseline after the soak
    warmup_seconds: float


QUICK = Mode(
    name="quick",
    reps=3,
    run_seconds=1.0,
    sweep=(1, 64),
    large_sweep=(16,),
    rate_step_seconds=1.0,
    rate_reps=1,
    stream_c1=3,
    stream_levels=(16, 64),
    stream_rounds=1,
    idle_connections=1000,
    idle_hold_seconds=3.0,
    soak_seconds=30.0,
    soak_rate=200.0,
    soak_sample_seconds=1.0,
    soak_all_trioproxy_lanes=False,
    soak_settle_seconds=5.0,
    warmup_seconds=1.0,
)
FULL = Mode(
    name="full",
    reps=3,
    run_seconds=10.0,
    sweep=(1, 16, 64, 256),
    large_sweep=(1, 16, 64),
    rate_step_seconds=3.0,
    rate_reps=3,
    stream_c1=10,
    stream_levels=(16, 64, 128, 256, 512),
    stream_rounds=2,
    idle_connections=1000,
    idle_hold_seconds=8.0,
    soak_seconds=300.0,
    soak_rate=300.0,
    soak_sample_seconds=5.0,
    soak_all_trioproxy_lanes=True,
    soak_settle_seconds=90.0,
    warmup_seconds=3.0,
)


def small_prompt(model: str) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def large_prompt(model: str) -> bytes:
    text = ("The quick brown fox jumps over the lazy dog. " * 240)[:10240]
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return json.dumps(body, separators=(",", ":")).encode()


def stream_prompt(model: str) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "Stream a story."}], "stream": True}
    return json.dumps(body, separators=(",", ":")).encode()


def body_for(lane: Lane, scenario: str) -> bytes:
    model = lane.model.format(scenario=scenario)
    return {"small": small_prompt, "large": large_prompt, "stream": stream_prompt}[scenario](model)


class Runner:
    """Runs scenarios over the live lanes; ``gen_cpu`` (load generator core) and ``workdir`` for wrk scripts."""

    def __init__(
        self,
        mode: Mode,
        lanes: list[Lane],
        workdir: Path,
        *,
        use_wrk: bool,
        gen_cpu: int | None,
        proxy_cpu: int | None,
    ) -> None:
        self.mode = mode
        self.proxy_cpu = proxy_cpu
        # CPU spent by the upstreams is ours too; anything else busy on the machine is "other load".
        self.upstream_pids = [pid for lane in lanes if not lane.is_proxy for pid in lane.pids()]
        self.lanes = [lane for lane in lanes if lane.skipped is None]
        self.workdir = workdir
        self.use_wrk = use_wrk and loadgen.wrk_path() is not None
        self.gen_cpu = gen_cpu
        self.log: Callable[[str], None] = print

    # --- helpers -----------------------------------------------------------------------------------------

    def _order(self, rep: int, lanes: list[Lane] | None = None) -> list[Lane]:
        lanes = lanes if lanes is not None else self.lanes
        shift = rep % len(lanes) if lanes else 0
        return lanes[shift:] + lanes[:shift]

    @contextlib.contextmanager
    def placed(self, lane: Lane) -> Iterator[None]:
        """The direct lane's upstream moves to the proxy's CPU for its own runs, so every lane's requests cross
        the same two cores (perf-anchors.md §1); it goes back to the generator's CPU afterwards."""
        if lane.is_proxy or self.proxy_cpu is None or self.gen_cpu is None:
            yield
            return
        set_affinity(lane.pids(), {self.proxy_cpu})
        try:
            yield
        finally:
            set_affinity(lane.pids(), {self.gen_cpu})

    def _measured(self, lane: Lane, run: Callable[[], LoadResult]) -> dict[str, Any]:
        pids = lane.pids()
        with self.placed(lane):
            cpu0, up0, busy0 = cpu_seconds(pids), cpu_seconds(self.upstream_pids), cpu_busy()
            result = run()
            cpu1, up1, busy1 = cpu_seconds(pids), cpu_seconds(self.upstream_pids), cpu_busy()
        data = result.to_json()
        data["lane_cpu_s"] = cpu1 - cpu0
        data["cpu_per_request_us"] = (cpu1 - cpu0) / result.requests * 1e6 if result.requests else math.nan
        data["cpu_busy"] = busy_shares(busy0, busy1)
        upstream = 0.0 if not lane.is_proxy else up1 - up0
        own = cpu1 - cpu0 + upstream + result.gen_cpu * result.seconds
        data["other_cpu"] = other_load(busy0, busy1, own, result.seconds)
        return data

    def closed(self, lane: Lane, scenario: str, concurrency: int, seconds: float) -> dict[str, Any]:
        target, body = lane.targets[scenario], body_for(lane, scenario)
        if self.use_wrk:
            script = loadgen.write_wrk_script(self.workdir, target, body)
            return self._measured(
                lane, lambda: loadgen.run_wrk(target, script, concurrency, seconds, self.gen_cpu)
            )
        return self._measured(
            lane, lambda: trio.run(loadgen.closed_loop_builtin, target, body, concurrency, seconds)
        )

    def warm_up(self) -> None:
        for lane in self.lanes:
            for scenario in ("small", "large"):
                self.closed(lane, scenario, 16, self.mode.warmup_seconds)
            trio.run(_streams, lane.targets["stream"], body_for(lane, "stream"), 1, 1)

    # --- closed loop ---------------------------------------------------------------------------------------

    def sweep(self, scenario: str) -> dict[str, Any]:
        levels = self.mode.sweep if scenario == "small" else self.mode.large_sweep
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {lane.name: {} for lane in self.lanes}
        for rep in range(self.mode.reps):
            for concurrency in levels:
                for lane in self._order(rep):
                    data = self.closed(lane, scenario, concurrency, self.mode.run_seconds)
                    data.pop("sample", None)
                    runs[lane.name].setdefault(str(concurrency), []).append(data)
                    self.log(
                        f"  {scenario} c={concurrency:<3} {lane.name:<14} {data['rps']:>9,.0f} rps  "
                        f"p50 {data['p50']:.3f} ms  p99 {data['p99']:.2f} ms  errors {data['errors']}"
                    )
        return {"levels": list(levels), "generator": "wrk" if self.use_wrk else "builtin", "runs": runs}

    # --- open loop -----------------------------------------------------------------------------------------

    def rate(self) -> dict[str, Any]:
        runs: dict[str, list[dict[str, Any]]] = {lane.name: [] for lane in self.lanes}
        for rep in range(self.mode.rate_reps):
            for lane in self._order(rep):
                with self.placed(lane):
                    steps = trio.run(self._ladder, lane)
                held5 = max((s["offered_rate"] for s in steps if s["held"] and s["p99"] < 5), default=0)
                held50 = max((s["offered_rate"] for s in steps if s["held"] and s["p99"] < 50), default=0)
                runs[lane.name].append({"held_5ms": held5, "held_50ms": held50, "steps": steps})
                self.log(
                    f"  rate {lane.name:<14} held {held5:,} rps at p99<5 ms, {held50:,} rps at p99<50 ms"
                )
        return {"ladder": list(RATE_LADDER), "step_seconds": self.mode.rate_step_seconds, "runs": runs}

    async def _ladder(self, lane: Lane) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        client = OpenLoop(lane.targets["small"], body_for(lane, "small"))
        pids = lane.pids()
        try:
            for rate in RATE_LADDER:
                cpu0, up0, busy0 = cpu_seconds(pids), cpu_seconds(self.upstream_pids), cpu_busy()
                result = await client.run(rate, self.mode.rate_step_seconds)
                cpu1, up1, busy1 = cpu_seconds(pids), cpu_seconds(self.upstream_pids), cpu_busy()
                data = result.to_json()
                data.pop("sample", None)
                data["lane_cpu_s"] = cpu1 - cpu0
                data["cpu_busy"] = busy_shares(busy0, busy1)
                upstream = 0.0 if not lane.is_proxy else up1 - up0
                own = cpu1 - cpu0 + upstream + result.gen_cpu * result.seconds
                data["other_cpu"] = other_load(busy0, busy1, own, result.seconds)
                completed = result.requests / max(1, int(rate * self.mode.rate_step_seconds))
                data["held"] = result.errors == 0 and completed >= 0.95
                steps.append(data)
                if not data["held"] or result.p99 >= 50:
                    break
        finally:
            await client.aclose()
        return steps

    # --- streaming -----------------------------------------------------------------------------------------

    def stream(self) -> dict[str, Any]:
        c1: dict[str, list[dict[str, Any]]] = {lane.name: [] for lane in self.lanes}
        for rep in range(self.mode.reps):
            for lane in self._order(rep):
                with self.placed(lane):
                    samples = trio.run(
                        _streams, lane.targets["stream"], body_for(lane, "stream"), 1, self.mode.stream_c1
                    )
                c1[lane.name] += [_sample_json(s) for s in samples]
        for lane in self.lanes:
            summary = summarise_streams(c1[lane.name])
            self.log(
                f"  stream c=1 {lane.name:<14} first token p50 {summary['first_token_p50']:.2f} ms  "
                f"gap p50/p99 {summary['gap_p50']:.2f}/{summary['gap_p99']:.2f} ms  coalesced {summary['coalesced']}"
            )
        ladder: dict[str, dict[str, Any]] = {lane.name: {} for lane in self.lanes}
        failed: set[str] = set()
        for index, level in enumerate(self.mode.stream_levels):
            for lane in self._order(index):
                if lane.name in failed:
                    continue
                pids = lane.pids()
                cpu0 = cpu_seconds(pids)
                started = time.perf_counter()
                with self.placed(lane):
                    samples = trio.run(
                        _streams,
                        lane.targets["stream"],
                        body_for(lane, "stream"),
                        level,
                        self.mode.stream_rounds,
                    )
                wall = time.perf_counter() - started
                cpu = cpu_seconds(pids) - cpu0
                data = summarise_streams([_sample_json(s) for s in samples])
                data["wall_s"] = wall
                data["lane_cpu_s"] = cpu
                data["cpu_per_event_us"] = cpu / data["events"] * 1e6 if data["events"] else math.nan
                data["held"] = data["errors"] == 0 and data["late"] == 0
                data["gaps_sample"] = data.pop("gaps")[:: max(1, data["gap_count"] // 2000)]
                ladder[lane.name][str(level)] = data
                if not data["held"]:
                    failed.add(lane.name)
                self.log(
                    f"  stream c={level:<4} {lane.name:<14} held={data['held']} late={data['late']} "
                    f"errors={data['errors']} first token p99 {data['first_token_p99']:.1f} ms  "
                    f"CPU/event {data['cpu_per_event_us']:.0f} µs"
                )
        most = {
            name: max((int(level) for level, d in levels.items() if d["held"]), default=0)
            for name, levels in ladder.items()
        }
        return {
            "c1": {name: summarise_streams(s) for name, s in c1.items()},
            "ladder": ladder,
            "most_held": most,
        }

    # --- idle connections ----------------------------------------------------------------------------------

    def idle(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lane in self.lanes:
            if not lane.is_proxy:
                continue
            out[lane.name] = trio.run(self._idle_one, lane)
            d = out[lane.name]
            self.log(
                f"  idle {lane.name:<14} {d['per_connection_kb']:.1f} KB/conn  {d['still_open']}/{d['connections']} "
                f"open after {self.mode.idle_hold_seconds:g} s  idle RSS {d['rss_before_mb']:.1f} MB"
            )
        return out

    async def _idle_one(self, lane: Lane) -> dict[str, Any]:
        pids = lane.pids()
        per_process = {str(pid): {"role": process_role(pid), **memory([pid])} for pid in pids}
        before = memory(pids)
        count = self.mode.idle_connections
        connections = await loadgen.open_idle_connections(
            lane.targets["small"], body_for(lane, "small"), count
        )
        try:
            await trio.sleep(self.mode.idle_hold_seconds)
            after = memory(pids)
            alive = loadgen.still_open(connections)
        finally:
            for connection in connections:
                await connection.aclose()
        return {
            "connections": count,
            "still_open": alive,
            "rss_before_mb": before["rss_mb"],
            "pss_before_mb": before["pss_mb"],
            "rss_after_mb": after["rss_mb"],
            "per_connection_kb": (after["rss_mb"] - before["rss_mb"]) * 1024 / count,
            "per_process_idle": per_process,
        }

    # --- soak ----------------------------------------------------------------------------------------------

    def soak(self) -> dict[str, Any]:
        lanes = [lane for lane in self.lanes if lane.name.startswith("trioproxy")]
        if not self.mode.soak_all_trioproxy_lanes:
            lanes = lanes[:1]
        out = {}
        for lane in lanes:
            out[lane.name] = trio.run(self._soak_one, lane)
            d = out[lane.name]
            self.log(
                f"  soak {lane.name:<14} {d['rate']:g} rps for {d['seconds']:g} s: RSS {d['rss_start_mb']:.1f} -> "
                f"{d['rss_end_mb']:.1f} MB ({d['rss_growth_mb_per_min']:+.2f} MB/min), fds {d['fds_baseline']} -> "
                f"{d['fds_after']}, errors {d['errors']}, p99 {d['p99']:.2f} ms"
            )
        return out

    async def _soak_one(self, lane: Lane) -> dict[str, Any]:
        rate, seconds = self.mode.soak_rate, self.mode.soak_seconds
        target, body = lane.targets["small"], body_for(lane, "small")
        warm = OpenLoop(target, body)
        await warm.run(rate, 2.0)
        await warm.aclose()
        await trio.sleep(1.5)  # the server notices the closed connections
        pids = lane.pids()
        fds_baseline, rss_baseline = open_fds(pids), memory(pids)["rss_mb"]
        samples: list[tuple[float, float, int]] = []
        client = OpenLoop(target, body)
        started = time.perf_counter()

        async def sample(cancel: trio.CancelScope) -> None:
            with cancel:
                while True:
                    live = [p for root in lane.processes for p in process_tree(root.pid)]
                    samples.append((time.perf_counter() - started, memory(live)["rss_mb"], open_fds(live)))
                    await trio.sleep(self.mode.soak_sample_seconds)

        sampler = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample, sampler)
            result = await client.run(rate, seconds)
            sampler.cancel()
        await client.aclose()
        # Back to baseline means: client connections closed, and the upstream keep-alive connections a burst
        # opened expired from the pool (60 s idle by default). Poll until then, bounded.
        settle_started = time.perf_counter()
        await trio.sleep(1.5)
        while True:
            pids = lane.pids()
            fds_after = open_fds(pids)
            waited = time.perf_counter() - settle_started
            if fds_after <= fds_baseline + 2 or waited >= self.mode.soak_settle_seconds:
                break
            await trio.sleep(1.0)
        rss_after = memory(pids)["rss_mb"]
        tail = [(t, rss) for t, rss, _ in samples if t >= 0.2 * seconds]
        return {
            "rate": rate,
            "seconds": seconds,
            "requests": result.requests,
            "errors": result.errors,
            "p50": result.p50,
            "p99": result.p99,
            "rss_baseline_mb": rss_baseline,
            "rss_start_mb": samples[0][1] if samples else math.nan,
            "rss_end_mb": rss_after,
            "rss_growth_mb_per_min": _slope(tail) * 60,
            "fds_baseline": fds_baseline,
            "fds_peak": max((f for _, _, f in samples), default=0),
            "fds_after": fds_after,
            "fds_settle_seconds": round(waited, 1),
            "samples": [[round(t, 2), round(r, 3), f] for t, r, f in samples],
        }


# ------------------------------------------------------------------------------------------------ helpers


async def _streams(target: Target, body: bytes, concurrency: int, rounds: int) -> list[loadgen.StreamSample]:
    """``concurrency`` connections at once, each running ``rounds`` streams one after another."""
    payload = target.request_bytes(body)
    samples: list[loadgen.StreamSample] = []

    async def one() -> None:
        connection: Connection | None = None
        try:
            for _ in range(rounds):
                try:
                    with trio.fail_after(30):
                        if connection is None:
                            connection = await Connection.open(target)
                        samples.append(await loadgen.stream_once(connection, payload))
                except (OSError, trio.BrokenResourceError, trio.TooSlowError, loadgen.HTTPError) as exc:
                    samples.append(loadgen.StreamSample(ok=False, error=type(exc).__name__))
                    if connection is not None:
                        await connection.aclose()
                    connection = None
        finally:
            if connection is not None:
                await connection.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(one)
    return samples


def _sample_json(sample: loadgen.StreamSample) -> dict[str, Any]:
    return {
        "ok": sample.ok,
        "ttfb": sample.ttfb,
        "first_token": sample.first_token,
        "total": sample.total,
        "gaps": sample.gaps,
        "tokens": len(sample.token_times),
        "reads": sample.reads,
        "events": sample.events,
        "error": sample.error,
    }


def summarise_streams(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s for s in samples if s["ok"]]
    gaps = sorted(g for s in ok for g in s["gaps"])
    first = sorted(s["first_token"] for s in ok)
    ttfb = sorted(s["ttfb"] for s in ok)
    total = sorted(s["total"] for s in ok)
    return {
        "streams": len(samples),
        "errors": len(samples) - len(ok),
        "ttfb_p50": loadgen.percentile(ttfb, 50),
        "first_token_p50": loadgen.percentile(first, 50),
        "first_token_p99": loadgen.percentile(first, 99),
        "total_p50": loadgen.percentile(total, 50),
        "gap_p50": loadgen.percentile(gaps, 50),
        "gap_p99": loadgen.percentile(gaps, 99),
        "gap_max": gaps[-1] if gaps else math.nan,
        "gap_count": len(gaps),
        "coalesced": sum(g < COALESCED_GAP_MS for g in gaps),
        "late": sum(g > LATE_GAP_MS for g in gaps),
        "events": sum(s["events"] for s in ok),
        "reads": sum(s["reads"] for s in ok),
        "gaps": gaps,
    }


def other_load(
    before: list[tuple[int, int]], after: list[tuple[int, int]], own_cpu_seconds: float, seconds: float
) -> float:
    """Cores kept busy by processes outside the benchmark (other jobs on a shared machine) during a run: all
    busy CPU time minus the lane's, the upstreams' and the generator's. Near 0 on a quiet machine."""
    busy = sum(b1 - b0 for (b0, _), (b1, _) in zip(before, after, strict=False)) / CLK_TCK
    return max(0.0, busy - own_cpu_seconds) / seconds if seconds else math.nan


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second); 0 with fewer than two points."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
