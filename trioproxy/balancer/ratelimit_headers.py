"""How long a provider wants a rate-limited key left alone, read from its 429 answer.

Sources, in the order they are believed:

1. ``retry-after-ms`` (milliseconds; OpenAI sends it and its SDK honours it) and ``retry-after`` (RFC 9110
   §10.2.3: delay-seconds or an HTTP-date). Anthropic sends ``retry-after`` on every 429.
2. Gemini's ``google.rpc.RetryInfo`` in the JSON error body: ``error.details[].retryDelay`` as a protobuf
   Duration (``"43s"``, ``"0.5s"``). Gemini sends no header for it.
3. The per-resource reset headers: OpenAI ``x-ratelimit-reset-{requests,tokens}`` as Go-style durations
   (``"1s"``, ``"6m0s"``, ``"20ms"``), Anthropic ``anthropic-ratelimit-{requests,tokens,input-tokens,
   output-tokens}-reset`` as RFC 3339 instants. A 429 names no resource, so the matching ``-remaining`` (and
   ``-limit``) headers pick it: the longest reset among resources with nothing left; else the resource with
   the smallest remaining share; else the earliest reset (a wrong guess costs one more free 429).

Everything returns seconds from now (``wall_now``, unix time, is needed for absolute dates), never negative, or
None when the answer carries nothing usable. Malformed values are ignored, never raised: a provider's header
must not break the request path. Pure code.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

Headers = Sequence[tuple[bytes, bytes]]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PROTO_DURATION = re.compile(r"(\d+(?:\.\d{1,9})?)s")
_RETRY_DELAY_IN_TEXT = re.compile(rb'"retryDelay"\s*:\s*"(\d+(?:\.\d{1,9})?)s"')
_OPENAI_RESOURCES = ("requests", "tokens")
_ANTHROPIC_RESOURCES = ("requests", "tokens", "input-tokens", "output-tokens")
_MAX_BODY_SCAN = 64 * 1024  # error bodies are small; never parse more than this of one


def parse_duration(text: str) -> float | None:
    """A Go ``time.Duration`` string as OpenAI prints it (``"6m0s"``, ``"1.5s"``, ``"20ms"``) or plain seconds."""
    text = text.strip()
    if not text:
        return None
    if _PLAIN_NUMBER.fullmatch(text):
        return _finite(float(text))
    total = 0.0
    end = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != end:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        end = match.end()
    if end != len(text):
        return None
    return _finite(total)


def parse_retry_after(value: str, *, wall_now: float) -> float | None:
    """``Retry-After``: delay-seconds (a decimal fraction is accepted) or an HTTP-date."""
    value = value.strip()
    if _PLAIN_NUMBER.fullmatch(value):
        return _finite(float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - wall_now)


def parse_rfc3339(value: str) -> float | None:
    """An RFC 3339 instant (``2024-08-01T12:00:15Z``) as unix time; one without an offset is taken as UTC."""
    value = value.strip()
    if len(value) < 19 or value[10] not in "Tt ":
        return None
    try:
        when = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_gemini_retry_delay(body_prefix: bytes) -> float | None:
    """``retryDelay`` of the ``RetryInfo`` detail in a Gemini error body (an object, or the one-element array a
    non-SSE stream answers with). A body cut short still yields its delay when the text is there."""
    body = body_prefix[:_MAX_BODY_SCAN]
    if b"retryDelay" not in body:
        return None
    try:
        parsed: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        match = _RETRY_DELAY_IN_TEXT.search(body)
        return _finite(float(match.group(1))) if match else None
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for detail in details:
        if not isinstance(detail, dict):
            continue
        kind = detail.get("@type")
        delay = detail.get("retryDelay")
        if isinstance(kind, str) and kind.endswith("google.rpc.RetryInfo") and isinstance(delay, str):
            duration = _PROTO_DURATION.fullmatch(delay.strip())
            if duration:
                return _finite(float(duration.group(1)))
    return None


def cooldown_seconds(headers: Headers, body_prefix: bytes = b"", *, wall_now: float) -> float | None:
    """How long to leave the key alone after this 429, in seconds; None when the answer does not say."""
    values = _first_values(headers)
    retry_after_ms = values.get("retry-after-ms")
    if retry_after_ms is not None and _PLAIN_NUMBER.fullmatch(retry_after_ms.strip()):
        seconds = _finite(float(retry_after_ms) / 1000.0)
        if seconds is not None:
            return seconds
    retry_after = values.get("retry-after")
    if retry_after is not None:
        seconds = parse_retry_after(retry_after, wall_now=wall_now)
        if seconds is not None:
            return seconds
    delay = parse_gemini_retry_delay(body_prefix)
    if delay is not None:
        return delay
    return _from_reset_headers(values, wall_now=wall_now)


def _from_reset_headers(values: dict[str, str], *, wall_now: float) -> float | None:
    # (reset in seconds, remaining, limit) per resource that has a parseable reset
    resources: list[tuple[float, int | None, int | None]] = []
    for name in _OPENAI_RESOURCES:
        raw = values.get(f"x-ratelimit-reset-{name}")
        reset = parse_duration(raw) if raw is not None else None
        if reset is not None:
            resources.append(
                (
                    reset,
                    _int(values.get(f"x-ratelimit-remaining-{name}")),
                    _int(values.get(f"x-ratelimit-limit-{name}")),
                )
            )
    for name in _ANTHROPIC_RESOURCES:
        raw = values.get(f"anthropic-ratelimit-{name}-reset")
        instant = parse_rfc3339(raw) if raw is not None else None
        if instant is not None:
            resources.append(
                (
                    max(0.0, instant - wall_now),
                    _int(values.get(f"anthropic-ratelimit-{name}-remaining")),
                    _int(values.get(f"anthropic-ratelimit-{name}-limit")),
                )
            )
    if not resources:
        return None
    exhausted = [reset for reset, remaining, _ in resources if remaining == 0]
    if exhausted:
        return max(exhausted)
    shares = [
        (remaining / limit, reset)
        for reset, remaining, limit in resources
        if remaining is not None and limit is not None and limit > 0
    ]
    if shares:
        return min(shares)[1]
    return min(reset for reset, _, _ in resources)


def _first_values(headers: Headers) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name not in values:
            values[name] = raw_value.decode("latin-1")
    return values


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    # 18 digits: int() refuses over 4300 and no provider counts past a quintillion.
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _finite(seconds: float) -> float | None:
    return seconds if math.isfinite(seconds) else None
