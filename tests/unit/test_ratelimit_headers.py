"""Rate-limit reset parsing, with header blocks as the providers send them."""

from __future__ import annotations

import email.utils
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.balancer.ratelimit_headers import (
    cooldown_seconds,
    parse_duration,
    parse_gemini_retry_delay,
    parse_retry_after,
    parse_rfc3339,
)

NOW = 1_722_513_600.0  # 2024-08-01T12:00:00Z


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


# An OpenAI 429 for an exhausted token budget (header names and value formats as the API sends them).
OPENAI_429 = h(
    ("date", "Thu, 01 Aug 2024 12:00:00 GMT"),
    ("content-type", "application/json; charset=utf-8"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "2000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "0"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "6m0s"),
    ("x-request-id", "req_7b1c2f0e4c3d"),
)
# An Anthropic 429: retry-after plus per-resource resets as RFC 3339 instants.
ANTHROPIC_429 = h(
    ("retry-after", "17"),
    ("anthropic-ratelimit-requests-limit", "50"),
    ("anthropic-ratelimit-requests-remaining", "0"),
    ("anthropic-ratelimit-requests-reset", "2024-08-01T12:00:17Z"),
    ("anthropic-ratelimit-input-tokens-limit", "40000"),
    ("anthropic-ratelimit-input-tokens-remaining", "38000"),
    ("anthropic-ratelimit-input-tokens-reset", "2024-08-01T12:00:01Z"),
    ("anthropic-ratelimit-output-tokens-limit", "8000"),
    ("anthropic-ratelimit-output-tokens-remaining", "8000"),
    ("anthropic-ratelimit-output-tokens-reset", "2024-08-01T12:00:00Z"),
    ("request-id", "req_018EeWyXxfu5pfWkrYcMdjWG"),
)
# A Gemini 429 body (google.rpc.Status with QuotaFailure, Help and RetryInfo details).
GEMINI_429 = json.dumps(
    {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
                            "quotaValue": "15",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "43s"},
            ],
        }
    },
    indent=2,
).encode()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("6ms", 0.006),
        ("17.28s", 17.28),
        ("1h2m3.5s", 3723.5),
        ("2h0m0s", 7200.0),
        ("0s", 0.0),
        ("250us", 0.00025),
        ("3", 3.0),
        ("0.5", 0.5),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "m1s", "1s 2s", "-1s", "1.2.3s", "1s!", "inf", "nan"])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("120", wall_now=NOW) == 120.0
    assert parse_retry_after(" 1.5 ", wall_now=NOW) == 1.5
    assert parse_retry_after("Thu, 01 Aug 2024 12:00:30 GMT", wall_now=NOW) == pytest.approx(30.0)
    assert parse_retry_after("Thursday, 01-Aug-24 12:00:30 GMT", wall_now=NOW) == pytest.approx(30.0)
    assert parse_retry_after("Thu Aug  1 12:00:30 2024", wall_now=NOW) == pytest.approx(30.0)
    assert parse_retry_after("Thu, 01 Aug 2024 11:00:00 GMT", wall_now=NOW) == 0.0  # in the past
    for bad in ("soon", "-5", "", "1e9", "Thu, 99 Aug 2024 12:00:30 GMT"):
        assert parse_retry_after(bad, wall_now=NOW) is None


def test_rfc3339() -> None:
    assert parse_rfc3339("2024-08-01T12:00:17Z") == NOW + 17
    assert parse_rfc3339("2024-08-01T12:00:17.500Z") == NOW + 17.5
    assert parse_rfc3339("2024-08-01T14:00:17+02:00") == NOW + 17
    assert parse_rfc3339("2024-08-01t12:00:17z") == NOW + 17
    for bad in ("2024-08-01", "yesterday", "2024-13-01T00:00:00Z", ""):
        assert parse_rfc3339(bad) is None


def test_openai_429_waits_for_the_exhausted_resource() -> None:
    assert cooldown_seconds(OPENAI_429, wall_now=NOW) == pytest.approx(360.0)


def test_openai_429_without_remaining_headers_takes_the_earliest_reset() -> None:
    headers = h(("x-ratelimit-reset-requests", "1s"), ("x-ratelimit-reset-tokens", "6m0s"))
    assert cooldown_seconds(headers, wall_now=NOW) == 1.0


def test_openai_429_picks_the_resource_with_the_smallest_share_left() -> None:
    headers = h(
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "50"),
        ("x-ratelimit-reset-requests", "30s"),
        ("x-ratelimit-limit-tokens", "10000"),
        ("x-ratelimit-remaining-tokens", "10"),
        ("x-ratelimit-reset-tokens", "2s"),
    )
    assert cooldown_seconds(headers, wall_now=NOW) == 2.0


def test_retry_after_wins_over_reset_headers() -> None:
    assert cooldown_seconds(ANTHROPIC_429, wall_now=NOW) == 17.0
    assert cooldown_seconds([*OPENAI_429, (b"retry-after-ms", b"1500")], wall_now=NOW) == 1.5


def test_anthropic_reset_headers_alone() -> None:
    without_retry_after = [pair for pair in ANTHROPIC_429 if pair[0] != b"retry-after"]
    assert cooldown_seconds(without_retry_after, wall_now=NOW) == pytest.approx(17.0)


def test_gemini_retry_info() -> None:
    assert parse_gemini_retry_delay(GEMINI_429) == 43.0
    assert cooldown_seconds(h(("content-type", "application/json")), GEMINI_429, wall_now=NOW) == 43.0
    assert parse_gemini_retry_delay(b"[" + GEMINI_429 + b"]") == 43.0  # a non-SSE stream's array
    cut = GEMINI_429[: GEMINI_429.index(b'"retryDelay"') + 20]
    assert parse_gemini_retry_delay(cut) == 43.0  # the body prefix was cut after the value
    fractional = GEMINI_429.replace(b'"43s"', b'"0.250s"')
    assert parse_gemini_retry_delay(fractional) == 0.25


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json retryDelay",
        b'{"error": {"details": "retryDelay"}}',
        b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.Help", "retryDelay": "3s"}]}}',
        b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3m"}]}}',
        b'[{"retryDelay": "3s"}]',
    ],
)
def test_gemini_bodies_without_a_usable_delay(body: bytes) -> None:
    assert parse_gemini_retry_delay(body) is None


def test_nothing_to_go_by() -> None:
    assert cooldown_seconds(h(("content-type", "application/json")), b"{}", wall_now=NOW) is None
    assert cooldown_seconds(h(("retry-after", "whenever")), wall_now=NOW) is None
    assert cooldown_seconds(h(("x-ratelimit-reset-tokens", "6 minutes")), wall_now=NOW) is None


def test_absurd_values_do_not_raise() -> None:
    huge = "9" * 5000
    headers = h(
        ("retry-after", huge),
        ("retry-after-ms", huge),
        ("x-ratelimit-remaining-tokens", huge),
        ("x-ratelimit-reset-tokens", huge + "s"),
    )
    assert cooldown_seconds(headers, wall_now=NOW) is None


@given(seconds=st.integers(min_value=0, max_value=10**7))
def test_http_dates_round_trip(seconds: int) -> None:
    date = email.utils.formatdate(NOW + seconds, usegmt=True)
    assert parse_retry_after(date, wall_now=NOW) == pytest.approx(seconds)


@given(h_=st.integers(0, 99), m=st.integers(0, 59), s=st.integers(0, 59), ms=st.integers(0, 999))
def test_go_duration_round_trip(h_: int, m: int, s: int, ms: int) -> None:
    text = (f"{h_}h" if h_ else "") + (f"{m}m" if m or h_ else "") + f"{s}.{ms:03d}s"
    assert parse_duration(text) == pytest.approx(h_ * 3600 + m * 60 + s + ms / 1000)


@given(
    headers=st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=60)), max_size=12), body=st.binary()
)
def test_any_bytes_give_a_finite_non_negative_answer_or_none(
    headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    result = cooldown_seconds(headers, body, wall_now=NOW)
    assert result is None or 0.0 <= result < float("inf")
