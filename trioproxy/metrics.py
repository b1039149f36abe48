"""Prometheus metrics of the data plane: what every request did, and what the process holds right now.

Two kinds of figures, one registry each way:

* **Per request** (:meth:`Metrics.observe`): the forwarder calls it once, at the very end of every request
  (``Forwarder._finish``, and ``Forwarder.reject`` for requests the server refused while parsing), with the
  finished :class:`~trioproxy.records.RequestRecord`. Requests by route, status and outcome; latency and time to
  first byte; tokens by kind; cost; failed upstream attempts (read from the record's attempt log, so a retried
  500 that the client never saw still counts); requests served in panic mode.
* **Current state** (:class:`StateCollector`): read when ``/metrics`` is scraped, from the parts of the running
  gateway: requests in flight, upstream connection pool sizes, provider key states and balancer state
  transitions, provider key pools in panic, the metering queue and spool, admission decisions, config version.
  Nothing is copied or polled in between.

Ownership: a :class:`Metrics` owns its :class:`~prometheus_client.CollectorRegistry` (never prometheus_client's
global ``REGISTRY``), and the process owns the :class:`Metrics` (``RunningGateway.metrics``), so two gateways in
one test process never mix their counts. Nothing happens at import time.

Cardinality: labels are routes (a fixed table), HTTP statuses, outcomes, provider kinds, token kinds and key
states: all bounded. No key ids, key names, models or users appear in labels; per-key and per-model figures are
in the admin API (``/api/loadbalancer/status``, ``/api/statistics/*``).

Error handling: :meth:`Metrics.observe` never raises (it runs in a ``finally`` that may be unwinding a
cancellation); a malformed attempt log is skipped and logged.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import orjson
from prometheus_client import CollectorRegistry, Info
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import trioproxy
from trioproxy.balancer.health import KeyState
from trioproxy.records import RequestRecord

if TYPE_CHECKING:
    from trioproxy.balancer import Balancer
    from trioproxy.limits import Admission
    from trioproxy.metering import MeteringWriter
    from trioproxy.pool import ConnectionPool
    from trioproxy.reloader import SnapshotHolder
    from trioproxy.server import ProxyServer

logger = logging.getLogger(__name__)

# Whole requests: from a few milliseconds (a refusal) to the longest generation a total timeout allows.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Time to the first byte of the provider's answer: what users feel as "the model is thinking".
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")
NO_KIND = "none"  # requests refused before a provider was known


class GatewayParts(Protocol):
    """What :class:`StateCollector` reads; :class:`trioproxy.app.RunningGateway` has all of it."""

    snapshots: SnapshotHolder
    metering: MeteringWriter
    pool: ConnectionPool
    server: ProxyServer
    balancer: Balancer
    admission: Admission


class LabelledCounter:
    """A counter by label values, in plain floats: updated by the event loop, read by a scrape."""

    __slots__ = ("created", "documentation", "labels", "name", "values")

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        try:
            self.values[labels] += amount
        except KeyError:
            self.values[labels] = amount
            self.created[labels] = time.time()

    def value(self, labels: tuple[str, ...] = ()) -> float:
        return self.values.get(labels, 0.0)

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value, created=self.created[labels])
        return family


class LabelledHistogram:
    """A histogram by label values: per-bucket counts (cumulated at scrape time) and the sum."""

    __slots__ = ("bounds", "created", "documentation", "labels", "name", "series")

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.bounds = buckets  # upper bounds, ascending; +Inf is implied
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
            self.created[labels] = time.time()
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less than or equal").
        series[0][bisect.bisect_left(self.bounds, value)] += 1
        series[1][0] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        edges = [*(repr(float(bound)) for bound in self.bounds), "+Inf"]  # as prometheus_client prints them
        for labels, (counts, total) in list(self.series.items()):
            cumulative = list(itertools.accumulate(counts))
            family.add_metric(list(labels), list(zip(edges, cumulative, strict=True)), total[0])
            # What prometheus_client's own Histogram exposes too (its metric family has no parameter for it).
            names = dict(zip(self.labels, labels, strict=True))
            family.samples.append(Sample(f"{self.name}_created", names, self.created[labels]))
        return family


class _Instruments(Collector):
    """Exposes the request instruments in the registry."""

    def __init__(self, instruments: list[LabelledCounter | LabelledHistogram]) -> None:
        self._instruments = instruments

    def collect(self) -> Iterator[Metric]:
        for instrument in self._instruments:
            yield instrument.family()


class Metrics:
    """The per-request metrics of one gateway process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        Info("trioproxy_build", "The running trioproxy version.", registry=registry).info(
            {"version": trioproxy.__version__}
        )
        # Counted in plain dicts and lists and exposed by a collector at scrape time: prometheus_client's
        # instruments take a lock and validate labels on every call, which cost ~5% of a request's CPU.
        self.requests = LabelledCounter(
            "trioproxy_requests",
            "Requests answered by the proxy, by route, HTTP status and outcome (refusals included).",
            ("route", "status", "outcome"),
        )
        self.duration = LabelledHistogram(
            "trioproxy_request_duration_seconds",
            "Time from the start of a request to its end, by route.",
            ("route",),
            DURATION_BUCKETS,
        )
        self.ttfb = LabelledHistogram(
            "trioproxy_time_to_first_byte_seconds",
            "Time from the start of a request to the provider's response head, by route.",
            ("route",),
            TTFB_BUCKETS,
        )
        self.tokens = LabelledCounter(
            "trioproxy_tokens",
            "Tokens reported by providers (or estimated for broken-off streams), by provider kind and token kind.",
            ("provider_kind", "kind"),
        )
        self.cost = LabelledCounter(
            "trioproxy_cost_usd",
            "Cost of the requests in USD at the configured prices, by provider kind.",
            ("provider_kind",),
        )
        self.unpriced = LabelledCounter(
            "trioproxy_unpriced_requests",
            "Billable requests whose model has no price (their cost is unknown, never counted as 0).",
            ("provider_kind",),
        )
        self.upstream_errors = LabelledCounter(
            "trioproxy_upstream_errors",
            "Failed upstream attempts, retried ones included, by provider kind and cause "
            "(an HTTP status, 'transport' for connect/timeout/broken connections, 'stream_error' for an "
            "error event first in a stream, 'deadline' for the request's total deadline).",
            ("provider_kind", "cause"),
        )
        self.panic = LabelledCounter(
            "trioproxy_panic_requests",
            "Requests served while every key of their pool was unavailable (panic mode).",
            (),
        )
        instruments: list[LabelledCounter | LabelledHistogram] = [
            self.requests,
            self.duration,
            self.ttfb,
            self.tokens,
            self.cost,
            self.unpriced,
            self.upstream_errors,
            self.panic,
        ]
        registry.register(_Instruments(instruments))

    def __repr__(self) -> str:
        return f"<Metrics registry={id(self.registry):#x}>"

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request. Never raises."""
        try:
            self._observe(record)
        except Exception:
            logger.exception("metrics: could not count request %s", record.request_id)

    def _observe(self, record: RequestRecord) -> None:
        route = record.route
        kind = record.provider_kind or NO_KIND
        self.requests.inc((route, str(record.status), record.outcome.value))
        if record.duration_ms is not None:
            self.duration.observe((route,), max(0.0, record.duration_ms) / 1000.0)
        if record.ttfb_ms is not None:
            self.ttfb.observe((route,), max(0.0, record.ttfb_ms) / 1000.0)
        usage = record.usage
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
        )
        for token_kind, count in zip(TOKEN_KINDS, counts, strict=True):
            if count > 0:
                self.tokens.inc((kind, token_kind), count)
        if record.cost is not None and record.cost.total > 0:
            self.cost.inc((kind,), float(record.cost.total))
        if record.price_missing:
            self.unpriced.inc((kind,))
        if record.panic:
            self.panic.inc(())
        if record.attempt_log:
            for cause in failed_attempts(record.attempt_log):
                self.upstream_errors.inc((kind, cause))

    def render(self, gateway: GatewayParts | None = None) -> bytes:
        """The text exposition of these metrics and, with ``gateway``, of its current state."""
        collectors: list[Collector] = [self.registry]
        if gateway is not None:
            collectors.append(StateCollector(gateway))
        return generate_latest(_Union(collectors))


def failed_attempts(attempt_log: str) -> list[str]:
    """The cause of every failed attempt in a record's attempt log (see :class:`Metrics`' ``upstream_errors``)."""
    try:
        entries = orjson.loads(attempt_log)
    except orjson.JSONDecodeError:
        logger.warning("metrics: an attempt log is not JSON")
        return []
    causes = []
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        status, error = entry.get("status"), entry.get("error")
        if isinstance(status, int) and status >= 400:
            causes.append(str(status))
        elif error is None:
            continue
        elif entry.get("key") is None:
            causes.append("deadline")
        elif isinstance(status, int):
            causes.append("stream_error")  # a 2xx head whose first event was an error
        else:
            causes.append("transport")
    return causes


class _Union:
    """Several collectors exposed as one (``generate_latest`` takes any object with ``collect``)."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class StateCollector(Collector):
    """The gateway's current state, read at scrape time (see the module doc)."""

    def __init__(self, gateway: GatewayParts) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway
        yield _gauge(
            "trioproxy_in_flight_requests", "Requests being served right now.", gateway.server.active_requests
        )
        yield _gauge(
            "trioproxy_config_version",
            "Version of the live configuration snapshot.",
            gateway.snapshots.current.version,
        )

        pool = gateway.pool.stats()
        connections = GaugeMetricFamily(
            "trioproxy_upstream_connections", "Upstream connections by state.", labels=["state"]
        )
        connections.add_metric(["idle"], pool.idle)
        connections.add_metric(["in_use"], pool.in_use)
        connections.add_metric(["connecting"], pool.connecting)
        yield connections
        yield _gauge("trioproxy_upstream_origins", "Upstream origins with a connection pool.", pool.origins)
        yield _gauge(
            "trioproxy_upstream_pool_waiting", "Requests waiting for an upstream connection.", pool.waiting
        )
        yield _counter("trioproxy_upstream_connections_opened", "Upstream connections opened.", pool.opened)
        yield _counter(
            "trioproxy_upstream_connections_reused", "Exchanges on a reused connection.", pool.reused
        )

        yield from self._balancer(gateway)

        metering = gateway.metering.stats
        yield _gauge("trioproxy_metering_queued", "Request rows in memory, not yet written.", metering.queued)
        yield _gauge(
            "trioproxy_metering_spool_bytes", "Bytes in the metering spool file.", metering.spool_bytes
        )
        yield _counter(
            "trioproxy_metering_written", "Request rows written to the database.", metering.written
        )
        yield _counter(
            "trioproxy_metering_spooled", "Request rows appended to the spool file.", metering.spooled
        )
        yield _counter(
            "trioproxy_metering_failed_batches",
            "Database writes of request rows that failed.",
            metering.failed_batches,
        )
        yield _counter("trioproxy_metering_lost", "Request rows neither queued nor spooled.", metering.lost)

        decisions = CounterMetricFamily(
            "trioproxy_admission_decisions", "Limit decisions by result.", labels=["result"]
        )
        stats = gateway.admission.stats
        for result in ("admitted", "refused", "degraded"):
            decisions.add_metric([result], stats.get(result, 0))
        yield decisions

    def _balancer(self, gateway: GatewayParts) -> Iterator[Metric]:
        balancer = gateway.balancer
        transitions = CounterMetricFamily(
            "trioproxy_balancer_transitions",
            "Provider key state changes (local and adopted from other instances).",
            labels=["from", "to"],
        )
        for (old, new), count in sorted(balancer.transitions.items()):
            transitions.add_metric([old, new], count)
        yield transitions
        states: Tally[str] = Tally({state.value: 0 for state in KeyState})
        for key_id in balancer.key_ids():
            health = balancer.key_health(key_id)
            states[KeyState.ACTIVE.value if health is None else health.state.value] += 1
        keys = GaugeMetricFamily(
            "trioproxy_provider_keys", "Provider keys by health state.", labels=["state"]
        )
        for state, count in sorted(states.items()):
            keys.add_metric([state], count)
        yield keys
        snapshot = gateway.snapshots.current
        pools = [g for g in snapshot.gateway_keys.values() if g.enabled]
        sizes = Tally(len(g.pool) for g in pools)
        yield _gauge(
            "trioproxy_key_pools", "Enabled gateway keys (each fronts a pool of provider keys).", len(pools)
        )
        yield _gauge(
            "trioproxy_key_pool_keys",
            "Provider keys across the pools of enabled gateway keys.",
            sum(k * n for k, n in sizes.items()),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
