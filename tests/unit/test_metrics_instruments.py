"""The request instruments of :mod:`trioproxy.metrics` expose exactly what prometheus_client's own would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from tests.examples import examples
from trioproxy.metrics import DURATION_BUCKETS, LabelledCounter, LabelledHistogram, _Instruments

ROUTES = st.sampled_from(["openai.chat_completions", "anthropic.messages", "unknown"])


def _samples(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample but the ``_created`` timestamps (they differ by when each side saw a label first)."""
    out = []
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.append((sample.name, tuple(sorted(sample.labels.items())), round(sample.value, 9)))
    return sorted(out)


@settings(max_examples=examples(60), deadline=None)
@given(
    st.lists(
        st.tuples(
            ROUTES,
            st.one_of(
                st.sampled_from(DURATION_BUCKETS),  # a value on a bound belongs to that bound's bucket
                st.floats(min_value=0.0, max_value=1_000.0, allow_nan=False),
            ),
        ),
        max_size=40,
    )
)
def test_histogram_matches_prometheus_client(observations: list[tuple[str, float]]) -> None:
    ours = LabelledHistogram("req_seconds", "help", ("route",), DURATION_BUCKETS)
    theirs_registry = CollectorRegistry()
    theirs = Histogram("req_seconds", "help", ["route"], buckets=DURATION_BUCKETS, registry=theirs_registry)
    for route, value in observations:
        ours.observe((route,), value)
        theirs.labels(route).observe(value)
    ours_registry = CollectorRegistry()
    ours_registry.register(_Instruments([ours]))
    assert _samples(ours_registry) == _samples(theirs_registry)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(ROUTES, st.sampled_from(["200", "429"]), st.integers(1, 5000)), max_size=40))
def test_counter_matches_prometheus_client(increments: list[tuple[str, str, int]]) -> None:
    ours = LabelledCounter("reqs", "help", ("route", "status"))
    theirs_registry = CollectorRegistry()
    theirs = Counter("reqs", "help", ["route", "status"], registry=theirs_registry)
    for route, status, amount in increments:
        ours.inc((route, status), amount)
        theirs.labels(route, status).inc(amount)
    ours_registry = CollectorRegistry()
    ours_registry.register(_Instruments([ours]))
    assert _samples(ours_registry) == _samples(theirs_registry)
    for route, status, _ in increments:
        assert ours.value((route, status)) == theirs.labels(route, status)._value.get()


def test_created_timestamps_are_exposed_like_prometheus_client() -> None:
    histogram = LabelledHistogram("req_seconds", "help", ("route",), (0.1, 1.0))
    counter = LabelledCounter("reqs", "help", ())
    histogram.observe(("a",), 0.5)
    counter.inc(())
    registry = CollectorRegistry()
    collector: Collector = _Instruments([histogram, counter])
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'req_seconds_created{route="a"}' in text
    assert "reqs_created " in text
    assert 'req_seconds_bucket{le="1.0",route="a"} 1.0' in text
    assert 'req_seconds_bucket{le="0.1",route="a"} 0.0' in text
    assert "reqs_total 1.0" in text
