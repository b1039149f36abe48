"""A closed-loop HTTP load generator on trio + httpcore.

``concurrency`` workers each send one request, wait for the whole answer, and send the next, for ``duration``
seconds. It reports requests per second, latency percentiles and errors. Used by ``bench/run_bench.py``; it is
never part of the test run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import httpcore
import trio


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
        return ordered[index]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


async def run_load(
    url: str,
    *,
    headers: list[tuple[str, str]],
    body: bytes,
    concurrency: int,
    duration: float,
    expect: bytes | None = None,
) -> LoadResult:
    """Drive `url` with POST requests; a response that is not 200 or lacks `expect` counts as an error."""
    latencies: list[float] = []
    errors = 0
    done = 0

    async with httpcore.AsyncConnectionPool(max_connections=concurrency, keepalive_expiry=60) as pool:

        async def worker(deadline: float) -> None:
            nonlocal errors, done
            while trio.current_time() < deadline:
                started = trio.current_time()
                try:
                    with trio.fail_after(30):
                        response = await pool.request("POST", url, headers=headers, content=body)
                    ok = response.status == 200 and (expect is None or expect in response.content)
                except (
                    httpcore.TimeoutException,
                    httpcore.NetworkError,
                    httpcore.ProtocolError,
                    trio.TooSlowError,
                ):
                    ok = False
                if ok:
                    latencies.append((trio.current_time() - started) * 1000.0)
                    done += 1
                else:
                    errors += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, start + duration)
        elapsed = trio.current_time() - start
    return LoadResult(done, errors, elapsed, tuple(latencies))
