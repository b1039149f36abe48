"""Merging the reports of ``serve --workers N`` into the figures of the whole group.

The admin API runs in worker 0, but every worker counts its own requests, holds its own connection pool,
metering writer and balancer bookkeeping. The IPC collects one report per worker (worker 0 first); the functions
here turn those reports into one, so ``/metrics``, ``/api/loadbalancer/status`` and ``/api/health/detailed``
show the group as one gateway would. How a figure combines depends on what it counts:

* **Per-worker figures add up**: counters, histograms and summaries (every ``_bucket``, ``_sum`` and
  ``_count``); gauges of a worker's own state (requests in flight, connections, the metering queue); a key's
  in-flight, trial and window counts; retry budgets (each worker has its own). A
  ``_created`` timestamp is the earliest one: the group's series began when its first worker's did.
* **Shared views are taken once**, from the first report that has them: every worker reports the same config
  snapshot and the same provider key states (a state change in one worker is adopted by the others), so a sum
  would show N times the keys that exist (and every worker counts the state changes it adopted, so their
  counts are taken once too). Hence :data:`SHARED_VIEW_GAUGES`, a key's state fields
  (:data:`KEY_STATE_FIELDS`) and a pool's descriptive fields and usable/available/panic. Info, stateset and
  unknown metric families describe rather than count, so they too come from the first report.
* **Ratios are recomputed** from the summed parts (a key's success rate) or weighted by the traffic behind
  them (its latency EWMA); "ago" times take the most recent event of any worker.

A family, sample, pool or key only some reports have is merged from those that have it, in first-seen order.
Pure code: no I/O, and the inputs are never mutated (the results are new objects), so a report can be merged
again or compared by a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from trioproxy.metrics import StateCollector

if TYPE_CHECKING:
    from trioproxy.metrics import GatewayParts, Metrics

# Families every worker reports about the same shared state: the config snapshot's version and its pools (the
# same snapshot in every worker), provider keys by health state, and the state transitions (each worker counts
# its own and those it adopted from the others, so every worker counts every shared change). A sum would
# multiply them by the number of workers; they are taken from the first report that has the sample.
SHARED_VIEW_GAUGES = frozenset(
    {
        "trioproxy_config_version",
        "trioproxy_provider_keys",
        "trioproxy_key_pools",
        "trioproxy_key_pool_keys",
        "trioproxy_balancer_transitions",
    }
)
# Families whose samples add up across workers; gauges add up too unless they are in SHARED_VIEW_GAUGES.
SUMMED_TYPES = frozenset({"counter", "histogram", "gaugehistogram", "summary"})

# A provider key's fields that describe its shared health state or its configuration: from the first report.
KEY_STATE_FIELDS = (
    "state",
    "reason",
    "available",
    "deadline_in",
    "ejections",
    "consecutive_failures",
    "name",
    "position",
    "enabled",
    "weight",
    # Every worker counts the changes it adopted from the others too (as trioproxy_balancer_transitions).
    "state_changes",
)
# A provider key's fields counted by each worker on its own: summed.
KEY_SUMMED_FIELDS = ("in_flight", "trial_in_flight", "window_ok", "window_failed")
# Decimals of the figures Balancer.status rounds, so a merged figure looks like a single worker's.
LATENCY_DECIMALS = 1  # balancer._ms
SUCCESS_RATE_DECIMALS = 4  # Balancer._key_status
RETRY_BUDGET_DECIMALS = 2  # Balancer.status

_SampleKey = tuple[str, tuple[tuple[str, str], ...]]

# -- metrics --------------------------------------------------------------------------------------------------


def metric_families(metrics: Metrics, gateway: GatewayParts | None) -> list[Metric]:
    """What one worker's ``/metrics`` would show (see :meth:`Metrics.render`), as picklable families.

    Families rather than text, so merging needs no parser and the group's text comes out of the same
    ``generate_latest`` as a single process's (see :func:`render_families`)."""
    families = list(metrics.registry.collect())
    if gateway is not None:
        families.extend(StateCollector(gateway).collect())
    return families


def merge_metric_families(reports: Sequence[Sequence[Metric]]) -> list[Metric]:
    """One list of families for the group, from each worker's :func:`metric_families` (see the module doc)."""
    firsts: dict[str, Metric] = {}
    samples: dict[str, dict[_SampleKey, list[Sample]]] = {}
    for report in reports:
        for family in report:
            firsts.setdefault(family.name, family)
            by_key = samples.setdefault(family.name, {})
            for sample in family.samples:
                by_key.setdefault((sample.name, tuple(sorted(sample.labels.items()))), []).append(sample)
    return [_merge_family(first, samples[name]) for name, first in firsts.items()]


def _merge_family(first: Metric, samples: dict[_SampleKey, list[Sample]]) -> Metric:
    family = Metric(first.name, first.documentation, first.type, first.unit)
    summed = first.name not in SHARED_VIEW_GAUGES and (first.type in SUMMED_TYPES or first.type == "gauge")
    created = f"{first.name}_created"
    for (name, _), seen in samples.items():
        sample = seen[0]
        value = sample.value
        if summed and len(seen) > 1:
            values = [s.value for s in seen]
            value = min(values) if name == created else sum(values)
        # A copy of the labels too: the result shares nothing mutable with the reports.
        family.samples.append(sample._replace(labels=dict(sample.labels), value=value))
    return family


class _Families:
    """Families exposed as a collector (``generate_latest`` takes any object with ``collect``)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render_families(families: Sequence[Metric]) -> bytes:
    """The Prometheus text exposition of ``families``, exactly as :meth:`Metrics.render` would write it."""
    return generate_latest(_Families(families))


# -- balancer status ------------------------------------------------------------------------------------------


def merge_balancer_status(reports: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One ``Balancer.status`` for the group: pools matched by gateway key, keys by id (see the module doc)."""
    return [_merge_pool(seen) for seen in _group(reports, "gateway_key_id").values()]


def _group(lists: Iterable[Iterable[dict[str, Any]]], field: str) -> dict[Any, list[dict[str, Any]]]:
    """The items of every list by their ``field``, in first-seen order; each group in report order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for items in lists:
        for item in items:
            groups.setdefault(item[field], []).append(item)
    return groups


def _merge_pool(seen: list[dict[str, Any]]) -> dict[str, Any]:
    # Descriptive fields, and usable/available/panic: they derive from the snapshot and the shared key states.
    pool = dict(seen[0])
    budgets = [p["retry_budget"] for p in seen if p["retry_budget"] is not None]
    pool["retry_budget"] = round(sum(budgets), RETRY_BUDGET_DECIMALS) if budgets else None
    pool["keys"] = [_merge_key(keys) for keys in _group((p["keys"] for p in seen), "id").values()]
    return pool


def _merge_key(seen: list[dict[str, Any]]) -> dict[str, Any]:
    key = dict(seen[0])  # KEY_STATE_FIELDS, and any field this module does not know of
    for field in KEY_SUMMED_FIELDS:
        key[field] = sum(k[field] for k in seen)
    ok, failed = key["window_ok"], key["window_failed"]
    key["success_rate"] = round(ok / (ok + failed), SUCCESS_RATE_DECIMALS) if ok + failed else None
    key["ewma_latency_ms"] = _mean_latency(seen)
    key["last_used_ago"] = min(
        (k["last_used_ago"] for k in seen if k["last_used_ago"] is not None), default=None
    )
    errors = [k for k in seen if k["last_error_ago"] is not None]
    if errors:
        latest = min(errors, key=lambda k: k["last_error_ago"])  # the first report's on a tie
        key["last_error"], key["last_error_ago"] = latest["last_error"], latest["last_error_ago"]
    return key


def _mean_latency(seen: list[dict[str, Any]]) -> float | None:
    """The workers' latency EWMAs weighted by the attempts in their windows: the busier worker knows more.

    Workers with no attempts in the window but an EWMA from earlier traffic count equally when no worker has
    any (a plain mean), and not at all otherwise."""
    measured: list[tuple[float, int]] = [
        (k["ewma_latency_ms"], k["window_ok"] + k["window_failed"])
        for k in seen
        if k["ewma_latency_ms"] is not None
    ]
    if not measured:
        return None
    weight = sum(w for _, w in measured)
    if weight == 0:
        return round(sum(v for v, _ in measured) / len(measured), LATENCY_DECIMALS)
    return round(sum(v * w for v, w in measured) / weight, LATENCY_DECIMALS)


# -- data plane health ----------------------------------------------------------------------------------------


def merge_data_plane(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``data_plane`` of ``/api/health/detailed`` for the group, plus ``workers``: how many reported.

    Every report is a running worker's. With no report at all, the group has no data plane to show."""
    if not reports:
        return {"running": False, "workers": 0}
    first = reports[0]
    return {
        "running": True,
        "proxy_port": first["proxy_port"],
        "config_version": first["config_version"],
        "in_flight": sum(r["in_flight"] for r in reports),
        "connections": _add_up(r["connections"] for r in reports),
        "metering": _add_up(r["metering"] for r in reports),
        "workers": len(reports),
    }


def _add_up(stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Numeric fields summed; any other field (``last_error``) from the first dict where it is not None (a
    database error seen by one worker only must not hide behind another's None)."""
    out: dict[str, Any] = {}
    for one in stats:
        for field, value in one.items():
            if field not in out or out[field] is None:
                out[field] = value
            elif _is_number(value) and _is_number(out[field]):
                out[field] += value
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
