"""Merging worker reports: metric families, balancer status and data-plane health of ``serve --workers N``."""

from __future__ import annotations

import copy
import json
import pickle
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import trioproxy
from tests.examples import examples
from tests.unit.test_balancer import balancer, gateway, key, serve, snapshot
from trioproxy.balancer import AttemptResult
from trioproxy.metering import MeteringStats
from trioproxy.metrics import GatewayParts, Metrics
from trioproxy.pool import PoolStats
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.reloader import SnapshotHolder
from trioproxy.worker_reports import (
    SHARED_VIEW_GAUGES,
    merge_balancer_status,
    merge_data_plane,
    merge_metric_families,
    metric_families,
    render_families,
)

# -- helpers --------------------------------------------------------------------------------------------------


def record(
    status: int = 200, *, duration_ms: float = 120.0, provider_kind: str | None = "openai", **fields: Any
) -> RequestRecord:
    return RequestRecord(
        request_id=f"req-{status}-{duration_ms}",
        started_at=1_722_513_600.0,
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="127.0.0.1",
        provider_kind=provider_kind,
        status=status,
        duration_ms=duration_ms,
        **fields,
    )


def observed_metrics() -> Metrics:
    metrics = Metrics()
    metrics.observe(
        record(
            ttfb_ms=40.0,
            usage=Usage(input_tokens=12, output_tokens=30, reasoning_tokens=5, reported=True),
            cost=CostBreakdown(Decimal("0.001"), Decimal("0.002"), Decimal(0), Decimal(0)),
        )
    )
    metrics.observe(
        record(
            502,
            duration_ms=3_000.0,
            outcome=Outcome.UPSTREAM_DIED,
            attempt_log=json.dumps(
                [{"key": 1, "status": 500, "error": None}, {"key": 2, "status": None, "error": "reset"}]
            ),
            price_missing=True,
        )
    )
    metrics.observe(record(429, duration_ms=2.0, outcome=Outcome.REJECTED, provider_kind=None, panic=True))
    return metrics


def fake_gateway(in_flight: int = 3, version: int = 7) -> GatewayParts:
    """The parts StateCollector reads: a real balancer and snapshot, the rest as plain figures."""
    gk = gateway((1, 2))
    snap = snapshot([key(1), key(2)], [gk], version=version)
    b = balancer()
    serve(b, gk, snap, 0.0, AttemptResult.status(429, [(b"retry-after", b"30")]))
    serve(b, gk, snap, 1.0, AttemptResult.ok(0.2))
    parts = SimpleNamespace(
        snapshots=SnapshotHolder(snap),
        balancer=b,
        server=SimpleNamespace(active_requests=in_flight),
        pool=SimpleNamespace(stats=lambda: PoolStats(2, 4, 1, 0, 0, opened=9, reused=30)),
        metering=SimpleNamespace(stats=MeteringStats(1, 40, 2, 0, None, 512, 0)),
        admission=SimpleNamespace(stats={"admitted": 5, "refused": 1, "degraded": 0}),
    )
    return cast(GatewayParts, parts)


def values(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def counter(name: str, value: float, created: float, **labels: str) -> CounterMetricFamily:
    family = CounterMetricFamily(name, "help", labels=list(labels))
    family.add_metric(list(labels.values()), value, created=created)
    return family


def gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, "help", value=value)


# -- metric families --------------------------------------------------------------------------------------------


def test_one_report_renders_byte_for_byte_like_metrics_render() -> None:
    metrics, parts = observed_metrics(), fake_gateway()
    for gw in (parts, None):
        rendered = render_families(merge_metric_families([metric_families(metrics, gw)]))
        assert rendered == metrics.render(gw)
    text = metrics.render(parts).decode()
    assert "trioproxy_build_info{" in text and "trioproxy_provider_keys{" in text  # both sources are there
    assert 'trioproxy_upstream_errors_total{cause="transport",provider_kind="openai"} 1.0' in text


def test_families_survive_pickle() -> None:
    metrics, parts = observed_metrics(), fake_gateway()
    families = metric_families(metrics, parts)
    again = pickle.loads(pickle.dumps(families))
    assert again == families
    assert render_families(again) == metrics.render(parts)


def test_two_real_workers_add_up() -> None:
    one, two = observed_metrics(), Metrics()
    two.observe(record())
    merged = render_families(
        merge_metric_families(
            [metric_families(one, fake_gateway(3, 7)), metric_families(two, fake_gateway(4, 7))]
        )
    )
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged.decode())
        for s in family.samples
    }
    route = ("route", "openai.chat_completions")
    assert parsed["trioproxy_requests_total", (("outcome", "ok"), route, ("status", "200"))] == 2
    assert parsed["trioproxy_requests_total", (("outcome", "rejected"), route, ("status", "429"))] == 1
    assert parsed["trioproxy_request_duration_seconds_count", (route,)] == 4
    assert parsed["trioproxy_in_flight_requests", ()] == 7
    assert parsed["trioproxy_config_version", ()] == 7
    assert parsed["trioproxy_provider_keys", (("state", "cooling_down"),)] == 1
    assert parsed["trioproxy_upstream_connections_opened_total", ()] == 18
    assert parsed["trioproxy_build_info", (("version", trioproxy.__version__),)] == 1


def test_counters_sum_and_created_is_the_earliest() -> None:
    merged = merge_metric_families(
        [
            [counter("reqs", 3, 100.0, route="a")],
            [counter("reqs", 4, 90.0, route="a")],
            [counter("reqs", 5, 80.0, route="b")],
        ]
    )
    assert values(merged) == {
        ("reqs_total", (("route", "a"),)): 7,
        ("reqs_created", (("route", "a"),)): 90.0,
        ("reqs_total", (("route", "b"),)): 5,
        ("reqs_created", (("route", "b"),)): 80.0,
    }


def test_histograms_and_summaries_sum_every_sample() -> None:
    def histogram(low: int, total: int, sum_value: float, created: float) -> list[Metric]:
        family = HistogramMetricFamily("secs", "help", labels=["route"])
        family.add_metric(["a"], [("0.1", low), ("+Inf", total)], sum_value)
        family.samples.append(Sample("secs_created", {"route": "a"}, created))
        latency = SummaryMetricFamily("lat", "help", count_value=total, sum_value=sum_value)
        return [family, latency]

    merged = merge_metric_families([histogram(1, 2, 0.5, 20.0), histogram(3, 5, 4.0, 10.0)])
    a = (("route", "a"),)
    assert values(merged) == {
        ("secs_bucket", (("le", "0.1"), ("route", "a"))): 4,
        ("secs_bucket", (("le", "+Inf"), ("route", "a"))): 7,
        ("secs_count", a): 7,
        ("secs_sum", a): 4.5,
        ("secs_created", a): 10.0,
        ("lat_count", ()): 7,
        ("lat_sum", ()): 4.5,
    }
    assert [s.name for s in merged[0].samples] == [
        "secs_bucket",
        "secs_bucket",
        "secs_count",
        "secs_sum",
        "secs_created",
    ]


def test_gauges_sum_but_shared_views_come_from_the_first_report() -> None:
    assert {
        "trioproxy_config_version",
        "trioproxy_provider_keys",
        "trioproxy_key_pools",
        "trioproxy_key_pool_keys",
        "trioproxy_balancer_transitions",
    } == SHARED_VIEW_GAUGES

    def report(in_flight: int, version: int, pools: int, ejected: int) -> list[Metric]:
        keys = GaugeMetricFamily("trioproxy_provider_keys", "help", labels=["state"])
        keys.add_metric(["ejected"], ejected)
        return [
            gauge("trioproxy_in_flight_requests", in_flight),
            gauge("trioproxy_config_version", version),
            gauge("trioproxy_key_pools", pools),
            gauge("trioproxy_key_pool_keys", pools * 3),
            keys,
        ]

    merged = values(merge_metric_families([report(2, 8, 4, 1), report(5, 9, 5, 2), report(1, 9, 5, 0)]))
    assert merged == {
        ("trioproxy_in_flight_requests", ()): 8,
        ("trioproxy_config_version", ()): 8,  # worker 0's, even while another one reloaded first
        ("trioproxy_key_pools", ()): 4,
        ("trioproxy_key_pool_keys", ()): 12,
        ("trioproxy_provider_keys", (("state", "ejected"),)): 1,
    }


def test_shared_view_sample_missing_in_the_first_report_comes_from_the_next() -> None:
    def keys(**by_state: int) -> list[Metric]:
        family = GaugeMetricFamily("trioproxy_provider_keys", "help", labels=["state"])
        for state, count in by_state.items():
            family.add_metric([state], count)
        return [family]

    merged = values(merge_metric_families([keys(active=2), keys(active=2, ejected=1), keys(ejected=3)]))
    assert merged == {
        ("trioproxy_provider_keys", (("state", "active"),)): 2,
        ("trioproxy_provider_keys", (("state", "ejected"),)): 1,
    }


def test_info_stateset_and_unknown_come_from_the_first_report() -> None:
    def report(version: str, up: bool, odd: float) -> list[Metric]:
        states = StateSetMetricFamily("mode", "help", value={"up": up, "down": not up})
        return [
            InfoMetricFamily("build", "help", value={"version": version}),
            states,
            UnknownMetricFamily("odd", "help", value=odd),
        ]

    merged = values(merge_metric_families([report("1.0", True, 2.0), report("1.0", False, 3.0)]))
    assert merged == {
        ("build_info", (("version", "1.0"),)): 1.0,
        ("mode", (("mode", "up"),)): 1.0,
        ("mode", (("mode", "down"),)): 0.0,
        ("odd", ()): 2.0,
    }


def test_families_missing_in_some_reports_merge_in_first_seen_order() -> None:
    merged = merge_metric_families(
        [
            [gauge("b", 1)],
            [counter("c", 2, 1.0), gauge("b", 2)],
            [gauge("a", 4), counter("c", 3, 2.0)],
        ]
    )
    assert [f.name for f in merged] == ["b", "c", "a"]
    assert values(merged) == {
        ("b", ()): 3,
        ("c_total", ()): 5,
        ("c_created", ()): 1.0,
        ("a", ()): 4,
    }
    assert merge_metric_families([]) == []


def test_merged_families_are_new_and_keep_type_documentation_and_unit() -> None:
    reports: list[list[Metric]] = [
        [GaugeMetricFamily("queue_seconds", "Queued time.", value=1.5, unit="seconds")],
        [GaugeMetricFamily("queue_seconds", "Another worker's text.", value=2.0, unit="seconds")],
    ]
    before = copy.deepcopy(reports)
    (merged,) = merge_metric_families(reports)
    assert (merged.name, merged.type, merged.documentation, merged.unit) == (
        "queue_seconds",
        "gauge",
        "Queued time.",
        "seconds",
    )
    assert merged.samples[0].value == 3.5
    assert merged is not reports[0][0] and reports == before
    merged.samples[0].labels["x"] = "y"
    assert reports == before  # the result shares no labels dict with the inputs


# -- balancer status ----------------------------------------------------------------------------------------


def key_status(key_id: int, **fields: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "id": key_id,
        "name": f"key-{key_id}",
        "position": key_id - 1,
        "enabled": True,
        "weight": 1,
        "state": "active",
        "reason": None,
        "available": True,
        "in_flight": 0,
        "trial_in_flight": 0,
        "ewma_latency_ms": None,
        "success_rate": None,
        "window_ok": 0,
        "window_failed": 0,
        "consecutive_failures": 0,
        "ejections": 0,
        "deadline_in": None,
        "last_error": None,
        "last_error_ago": None,
        "last_used_ago": None,
        "state_changes": 0,
    }
    status.update(fields)
    return status


def pool_status(gateway_key_id: int, keys: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "gateway_key_id": gateway_key_id,
        "gateway_key_name": f"gw-{gateway_key_id}",
        "gateway_key_prefix": "tp-abcd",
        "enabled": True,
        "provider_id": 1,
        "provider_name": "openai",
        "strategy": "round_robin",
        "effective_strategy": "round_robin",
        "retry_count": 2,
        "usable_keys": len(keys),
        "available_keys": len(keys),
        "panic": False,
        "retry_budget": None,
        "keys": keys,
    }
    status.update(fields)
    return status


def merged_key(*keys: dict[str, Any]) -> dict[str, Any]:
    (pool,) = merge_balancer_status([[pool_status(10, [k])] for k in keys])
    (only,) = pool["keys"]
    return cast(dict[str, Any], only)


def test_key_states_come_from_the_first_report_and_counts_add_up() -> None:
    first = key_status(
        1,
        state="ejected",
        reason="5 consecutive failures",
        available=False,
        deadline_in=25.0,
        ejections=2,
        consecutive_failures=5,
        in_flight=1,
        trial_in_flight=0,
        window_ok=3,
        window_failed=1,
        state_changes=2,
    )
    second = key_status(
        1,
        name="stale",
        weight=3,
        in_flight=2,
        trial_in_flight=1,
        window_ok=1,
        window_failed=3,
        consecutive_failures=1,
        state_changes=1,
    )
    merged = merged_key(first, second)
    assert merged == {
        **first,
        "in_flight": 3,
        "trial_in_flight": 1,
        "window_ok": 4,
        "window_failed": 4,
        "success_rate": 0.5,
    }
    assert merged_key(key_status(1, window_ok=2), key_status(1, window_ok=1))["success_rate"] == 1.0
    assert merged_key(key_status(1), key_status(1))["success_rate"] is None
    assert merged_key(key_status(1, window_ok=1), key_status(1, window_failed=2))["success_rate"] == 0.3333


def test_latency_is_weighted_by_the_window_attempts() -> None:
    def latency(*keys: tuple[float | None, int]) -> Any:
        return merged_key(*(key_status(1, ewma_latency_ms=v, window_ok=n) for v, n in keys))[
            "ewma_latency_ms"
        ]

    assert latency((100.0, 3), (200.0, 1)) == 125.0
    assert latency((100.0, 0), (200.0, 0)) == 150.0  # no window anywhere: a plain mean
    assert latency((100.0, 0), (200.0, 2)) == 200.0
    assert latency((None, 5), (80.0, 1)) == 80.0
    assert latency((None, 1), (None, 2)) is None
    assert latency((100.0, 1), (100.1, 2)) == 100.1  # 100.0667, rounded as Balancer.status rounds


def test_most_recent_use_and_error_win() -> None:
    merged = merged_key(
        key_status(1, last_used_ago=4.0, last_error="HTTP 500", last_error_ago=9.5),
        key_status(1, last_used_ago=0.25, last_error="HTTP 429", last_error_ago=3.0),
        key_status(1, last_used_ago=None, last_error=None, last_error_ago=None),
    )
    assert (merged["last_used_ago"], merged["last_error"], merged["last_error_ago"]) == (
        0.25,
        "HTTP 429",
        3.0,
    )
    merged = merged_key(key_status(1), key_status(1, last_error="timeout", last_error_ago=1.0))
    assert (merged["last_used_ago"], merged["last_error"], merged["last_error_ago"]) == (None, "timeout", 1.0)


def test_pools_keep_first_report_fields_and_sum_retry_budgets() -> None:
    first = pool_status(
        10,
        [key_status(1)],
        retry_budget=2.5,
        usable_keys=1,
        available_keys=0,
        panic=True,
        strategy="health_best",
    )
    second = pool_status(10, [key_status(1)], retry_budget=1.25, available_keys=1, panic=False)
    (merged,) = merge_balancer_status([[first], [second]])
    assert merged == {**first, "retry_budget": 3.75}
    (merged,) = merge_balancer_status([[pool_status(10, [])], [pool_status(10, [], retry_budget=1.5)]])
    assert merged["retry_budget"] == 1.5
    (merged,) = merge_balancer_status([[pool_status(10, [])], [pool_status(10, [])]])
    assert merged["retry_budget"] is None
    (merged,) = merge_balancer_status([[pool_status(10, [], retry_budget=0.1)]] * 3)
    assert merged["retry_budget"] == 0.3  # rounded as Balancer.status rounds, not 0.30000000000000004


def test_pools_and_keys_only_later_reports_have_come_last() -> None:
    reports = [
        [pool_status(20, [key_status(2), key_status(1)]), pool_status(10, [key_status(5)])],
        [pool_status(30, [key_status(7)]), pool_status(20, [key_status(3), key_status(1, in_flight=4)])],
    ]
    before = copy.deepcopy(reports)
    merged = merge_balancer_status(reports)
    assert [(p["gateway_key_id"], [k["id"] for k in p["keys"]]) for p in merged] == [
        (20, [2, 1, 3]),
        (10, [5]),
        (30, [7]),
    ]
    assert merged[0]["keys"][1]["in_flight"] == 4
    assert reports == before
    assert merge_balancer_status([]) == []


def test_real_balancer_reports_merge() -> None:
    gk = gateway((1, 2))
    snap = snapshot([key(1), key(2)], [gk])
    zero, one = balancer(), balancer()
    serve(zero, gk, snap, 0.0, AttemptResult.ok(0.1))  # key 1
    serve(one, gk, snap, 0.0, AttemptResult.ok(0.3))  # key 1
    serve(one, gk, snap, 1.0, AttemptResult.status(500))  # key 2
    one.attempt_started(1, now=2.0)
    reports = [zero.status(snap, now=3.0), one.status(snap, now=3.0)]
    assert merge_balancer_status(reports[:1]) == reports[0]
    (pool,) = merge_balancer_status(reports)
    first, second = pool["keys"]
    assert (first["window_ok"], first["in_flight"], first["ewma_latency_ms"]) == (2, 1, 200.0)
    assert (first["success_rate"], first["last_used_ago"]) == (1.0, 1.0)
    assert (second["window_failed"], second["success_rate"], second["last_error"]) == (1, 0.0, "HTTP 500")


# -- data plane -----------------------------------------------------------------------------------------------


def data_plane(port: int, version: int, in_flight: int, idle: int, written: int, error: str | None) -> Any:
    return {
        "running": True,
        "proxy_port": port,
        "config_version": version,
        "in_flight": in_flight,
        "connections": {"origins": 2, "idle": idle, "in_use": 1, "connecting": 0, "waiting": 0},
        "metering": {"queued": 1, "written": written, "spooled": 0, "last_error": error, "spool_bytes": 10},
    }


def test_data_plane_sums_numbers_and_keeps_the_first_value_otherwise() -> None:
    reports = [
        data_plane(8080, 7, 2, 3, 40, None),
        data_plane(8081, 8, 5, 1, 2, "OperationalError"),
        data_plane(8080, 7, 0, 0, 1, None),
    ]
    before = copy.deepcopy(reports)
    assert merge_data_plane(reports) == {
        "running": True,
        "proxy_port": 8080,
        "config_version": 7,
        "in_flight": 7,
        "connections": {"origins": 6, "idle": 4, "in_use": 3, "connecting": 0, "waiting": 0},
        "metering": {
            "queued": 3,
            "written": 43,
            "spooled": 0,
            "last_error": "OperationalError",  # the first one that is not None
            "spool_bytes": 30,
        },
        "workers": 3,
    }
    assert reports == before
    assert merge_data_plane(reports[1:2]) == {**reports[1], "workers": 1}
    assert merge_data_plane([]) == {"running": False, "workers": 0}


# -- properties -----------------------------------------------------------------------------------------------

names = st.sampled_from(["reqs", "secs", "lat", "trioproxy_config_version", "trioproxy_provider_keys", "up"])
labels = st.dictionaries(st.sampled_from(["route", "state"]), st.sampled_from(["a", "b"]), max_size=2)
counts = st.integers(0, 2**40).map(float)


@st.composite
def families(draw: st.DrawFn, *, counters_only: bool = False) -> list[Metric]:
    out: list[Metric] = []
    for name in draw(st.lists(names, unique=True, max_size=5)):
        kind = (
            "counter" if counters_only else draw(st.sampled_from(["counter", "gauge", "histogram", "info"]))
        )
        family = Metric(name, "help", kind)
        seen = set()
        for label_set in draw(st.lists(labels, max_size=4)):
            key_ = tuple(sorted(label_set.items()))
            if key_ in seen:
                continue
            seen.add(key_)
            if kind == "counter":
                family.add_sample(f"{name}_total", label_set, draw(counts))
                family.add_sample(f"{name}_created", label_set, draw(st.floats(0, 2e9)))
            elif kind == "histogram":
                family.add_sample(f"{name}_bucket", {**label_set, "le": "+Inf"}, draw(counts))
                family.add_sample(f"{name}_sum", label_set, draw(st.floats(0, 1e6)))
            else:
                family.add_sample(f"{name}_info" if kind == "info" else name, label_set, draw(counts))
        out.append(family)
    return out


@settings(max_examples=examples(100), deadline=None)
@given(families())
def test_merging_one_report_is_the_identity_for_families(report: list[Metric]) -> None:
    assert merge_metric_families([report]) == report


@settings(max_examples=examples(100), deadline=None)
@given(families(counters_only=True), st.integers(1, 6))
def test_k_copies_of_a_counter_report_multiply_each_count(report: list[Metric], k: int) -> None:
    merged = merge_metric_families([report] * k)
    once = tuple(SHARED_VIEW_GAUGES)  # shared views are never multiplied, whatever their type
    expected = {
        sample_key: value
        if sample_key[0].endswith("_created") or sample_key[0].startswith(once)
        else value * k
        for sample_key, value in values(report).items()
    }
    assert values(merged) == expected


opt_seconds = st.none() | st.floats(0, 1e5).map(lambda s: round(s, 3))


@st.composite
def key_statuses(draw: st.DrawFn, key_id: int) -> dict[str, Any]:
    ok, failed = draw(st.integers(0, 1000)), draw(st.integers(0, 1000))
    return key_status(
        key_id,
        state=draw(st.sampled_from(["active", "cooling_down", "ejected", "half_open", "invalid"])),
        reason=draw(st.none() | st.text(max_size=10)),
        in_flight=draw(st.integers(0, 50)),
        trial_in_flight=draw(st.integers(0, 1)),
        window_ok=ok,
        window_failed=failed,
        success_rate=round(ok / (ok + failed), 4) if ok + failed else None,
        ewma_latency_ms=draw(st.none() | st.floats(0, 1e6).map(lambda ms: round(ms, 1))),
        last_error=draw(st.none() | st.sampled_from(["HTTP 500", "timeout"])),
        last_error_ago=draw(opt_seconds),
        last_used_ago=draw(opt_seconds),
        state_changes=draw(st.integers(0, 100)),
    )


@st.composite
def balancer_statuses(draw: st.DrawFn) -> list[dict[str, Any]]:
    pools = []
    for gateway_key_id in draw(st.lists(st.integers(1, 50), unique=True, max_size=4)):
        ids = draw(st.lists(st.integers(1, 50), unique=True, max_size=5))
        keys = [draw(key_statuses(key_id)) for key_id in ids]
        budget = draw(st.none() | st.floats(0, 1e4).map(lambda b: round(b, 2)))
        pools.append(pool_status(gateway_key_id, keys, retry_budget=budget, panic=draw(st.booleans())))
    return pools


@settings(max_examples=examples(100), deadline=None)
@given(balancer_statuses())
def test_merging_one_report_is_the_identity_for_balancer_status(report: list[dict[str, Any]]) -> None:
    assert merge_balancer_status([report]) == report
