"""Cost per pick of each balancing strategy, and how exactly it splits traffic.

Usage::

    .venv/bin/python -m bench.strategies_bench [--picks 1000000] [--timing-picks 100000] [--sizes 2,10,100]

For pools of 2, 10 and 100 keys and each strategy it measures:

* ``strategy ns/pick``: ``Strategy.pick`` alone over prepared candidates (the algorithm's own cost);
* ``balancer ns/pick``: ``Balancer.pick`` on a snapshot (what the request path pays: eligibility, health
  lookups, building the candidates, the strategy);
* the distribution error over ``--picks`` picks (10^6 by default): the largest gap between a key's count and
  its exact share, in picks and relative to the share. The exact share is ``weight / total`` for
  ``weighted`` (weights 1, 2, ..., n) and an equal share for the others (equal keys: equal weights, nothing in
  flight, equal latency and success).

Prints a Markdown table (for docs/BENCHMARKS.md) after a line describing the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections import Counter

from trioproxy.balancer import Balancer
from trioproxy.balancer.strategies import STRATEGY_NAMES, KeyStats, PoolState, make_strategies
from trioproxy.pricing import PriceTable
from trioproxy.snapshot import GatewayKeyView, Origin, ProviderKeyView, ProviderKind, ProviderView, Snapshot


def weights_for(strategy: str, size: int) -> list[int]:
    return list(range(1, size + 1)) if strategy == "weighted" else [1] * size


def candidates(weights: list[int]) -> list[KeyStats]:
    return [
        KeyStats(key_id=i, position=i, weight=w, in_flight=0, ewma_latency=0.5, window_ok=20, window_failed=0)
        for i, w in enumerate(weights)
    ]


def snapshot(strategy: str, weights: list[int]) -> tuple[Snapshot, GatewayKeyView]:
    provider = ProviderView(
        id=1,
        name="openai",
        kind=ProviderKind.OPENAI,
        origin=Origin("https", "api.openai.com", 443),
        path_prefix="",
        extra_headers=(),
        connect_timeout=10.0,
        first_byte_timeout=60.0,
        idle_timeout=60.0,
        total_timeout=600.0,
        enabled=True,
    )
    keys = [
        ProviderKeyView(
            id=i, name=f"k{i}", provider_id=1, owner_id=None, secret=f"sk-{i}", weight=w, enabled=True
        )
        for i, w in enumerate(weights)
    ]
    gateway = GatewayKeyView(
        id=1,
        name="gw",
        owner_id=None,
        provider_id=1,
        prefix="tp-bench",
        pool=tuple(range(len(weights))),
        strategy=strategy,
        retry_count=0,
        allowed_models=None,
        expires_at=None,
        enabled=True,
    )
    return Snapshot.build(1, [provider], keys, {"h": gateway}, PriceTable([])), gateway


def strategy_ns(name: str, weights: list[int], picks: int) -> float:
    strategy = make_strategies(random.Random(1))[name]
    pool = candidates(weights)
    state = PoolState()
    pick = strategy.pick
    for _ in range(min(picks, 1000)):
        pick(pool, state)
    start = time.perf_counter_ns()
    for _ in range(picks):
        pick(pool, state)
    return (time.perf_counter_ns() - start) / picks


def balancer_ns(name: str, weights: list[int], picks: int) -> float:
    snap, gateway = snapshot(name, weights)
    balancer = Balancer(rng=random.Random(1))
    pick = balancer.pick
    for _ in range(min(picks, 1000)):
        pick(gateway, snap, now=0.0)
    start = time.perf_counter_ns()
    for _ in range(picks):
        pick(gateway, snap, now=0.0)
    return (time.perf_counter_ns() - start) / picks


def distribution_error(name: str, weights: list[int], picks: int) -> tuple[float, float]:
    """(largest |count - exact share| in picks, the same relative to the share in %)."""
    strategy = make_strategies(random.Random(2))[name]
    pool = candidates(weights)
    state = PoolState()
    counts = Counter(strategy.pick(pool, state) for _ in range(picks))
    total = sum(weights)
    worst_abs = worst_rel = 0.0
    for i, w in enumerate(weights):
        expected = picks * w / total
        gap = abs(counts[i] - expected)
        worst_abs = max(worst_abs, gap)
        worst_rel = max(worst_rel, 100.0 * gap / expected)
    return worst_abs, worst_rel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--picks", type=int, default=1_000_000, help="picks for the distribution error")
    parser.add_argument("--timing-picks", type=int, default=100_000, help="picks per timing")
    parser.add_argument("--sizes", default="2,10,100")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}; {args.picks:,} picks for the distribution, "
        f"{args.timing_picks:,} per timing"
    )
    print()
    print(
        "| strategy | keys | strategy ns/pick | balancer ns/pick | max error (picks) | max error (% of share) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for size in sizes:
        for name in STRATEGY_NAMES:
            weights = weights_for(name, size)
            s_ns = strategy_ns(name, weights, args.timing_picks)
            b_ns = balancer_ns(name, weights, args.timing_picks)
            gap, rel = distribution_error(name, weights, args.picks)
            print(f"| {name} | {size} | {s_ns:,.0f} | {b_ns:,.0f} | {gap:,.1f} | {rel:.3f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
