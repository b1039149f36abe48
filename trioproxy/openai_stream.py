"""OpenAI streaming usage injection (sans-IO).

OpenAI reports the usage of a streamed chat/completions (or legacy completions) request only when the request
sets ``stream_options.include_usage``. The gateway must meter every request, so it turns the option on
(:func:`prepare_stream_usage`); when the client had not asked for it, :class:`UsageChunkStripper` takes out of
the stream exactly what the option added, so the client sees the stream it asked for:

* the extra chunk before ``data: [DONE]`` whose ``choices`` is ``[]`` and whose ``usage`` is an object;
* the ``"usage":null`` member the option adds to every other chunk.

Everything else (comments, ``[DONE]``, in-band errors, unknown events, chunks in another serialization) passes
through byte-identical. The /v1/responses API always reports usage and needs none of this.
"""

from __future__ import annotations

import json
import re
from typing import Any

from trioproxy.sse import MAX_EVENT_BYTES, SSEEvent, SSEFramer

# The member exactly as OpenAI serializes it (compact JSON); any other spelling is left alone.
_NULL_MEMBER = b'"usage":null'
# What may follow it up to the end of a chunk on the fast path: plain string members, then the final brace.
_PLAIN_TAIL = re.compile(rb'(?:,"[^"\\]*":"[^"\\]*")*}')


def prepare_stream_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Turn on usage reporting for a streamed chat/completions or completions request body.

    Returns the body to send upstream and whether the client itself asked for usage (then the gateway
    must pass the usage chunk through, and must not use :class:`UsageChunkStripper`). A body that does not
    stream is returned unchanged, with True (nothing will be stripped). A ``stream_options`` that is neither
    an object nor null is left for the provider to reject, also with True. The caller applies this only on
    the chat/completions and completions routes; the input dict is never modified.
    """
    if body.get("stream") is not True:
        return body, True
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return body, True
    client_asked = options.get("include_usage") is True
    if client_asked:
        return body, True
    new_body = dict(body)
    new_body["stream_options"] = {**options, "include_usage": True}
    return new_body, False


def _split_single_data_line(raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """Split ``data: <payload><blank line>`` into (prefix, payload, terminator); None for any other shape."""
    line = raw.rstrip(b"\r\n")
    if b"\r" in line or b"\n" in line or not line.startswith(b"data:"):
        return None
    prefix_len = 6 if line.startswith(b"data: ") else 5
    return line[:prefix_len], line[prefix_len:], raw[len(line) :]


def _cut_trailing_null_usage(payload: bytes) -> bytes | None:
    """OpenAI's layout: ``"usage":null`` is the last member of the top-level object, or followed only by plain
    string members such as ``"obfuscation":"x7Yq"``; the payload without it, or None if it is not laid out so.

    A JSON object's text ends with the brace that closes the top level, and strings without quotes or
    backslashes cannot hide a token boundary, so a member found this way is top-level. (Inside a string every
    quote is escaped, so ``,"usage":null`` cannot appear there unescaped.)
    """
    last = payload.rfind(b"," + _NULL_MEMBER)
    if last >= 0 and _PLAIN_TAIL.fullmatch(payload, last + 1 + len(_NULL_MEMBER)):
        return payload[:last] + payload[last + 1 + len(_NULL_MEMBER) :]
    return None


def _without_null_usage(payload: bytes, chunk: dict[str, Any]) -> bytes | None:
    """The payload with its top-level ``"usage":null`` member cut out byte-exactly, or None if unsure."""
    fast = _cut_trailing_null_usage(payload)
    if fast is not None:
        return fast
    # Anywhere else: try each spot where it sits as a member and keep the cut that parses back to exactly
    # the chunk without "usage" (a nested "usage":null must stay).
    expected = {k: v for k, v in chunk.items() if k != "usage"}
    start = payload.find(_NULL_MEMBER)
    while start >= 0:
        end = start + len(_NULL_MEMBER)
        before, after = payload[start - 1 : start], payload[end : end + 1]
        candidate: bytes | None = None
        if before == b"," and after in (b",", b"}"):
            candidate = payload[: start - 1] + payload[end:]
        elif before == b"{" and after == b",":
            candidate = payload[:start] + payload[end + 1 :]
        if candidate is not None:
            try:
                if json.loads(candidate) == expected:
                    return candidate
            except (ValueError, RecursionError):
                pass
        start = payload.find(_NULL_MEMBER, end)
    return None


class UsageChunkStripper:
    """Removes what ``include_usage`` added to an OpenAI chat/completions stream (see the module docstring).

    ``feed()`` returns the bytes to send to the client now: every event that the new bytes completed, possibly
    rewritten; the bytes of an unfinished event wait for the rest of it. ``flush()`` at the end of the stream
    returns whatever is left, unchanged. Both also return the events they framed, which the usage meter reads
    (:meth:`~trioproxy.usage.UsageMeter.feed_events`). Only chunks whose ``"usage":null`` is not laid out as
    OpenAI does are JSON-parsed.

    Error handling: an event larger than ``max_event_bytes`` raises
    :class:`~trioproxy.errors.UpstreamProtocolError` (from the framer); the stream should then be aborted.
    """

    __slots__ = ("_framer",)

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._framer = SSEFramer(max_event_bytes=max_event_bytes)

    def __repr__(self) -> str:
        return f"<UsageChunkStripper {self._framer!r}>"

    def feed(self, data: bytes) -> tuple[bytes, list[SSEEvent]]:
        """Take upstream bytes; return the bytes the client should get now, and the complete events the bytes
        finished (unchanged, for the usage meter: one framing of the stream serves both)."""
        events = self._framer.feed(data)
        return b"".join([self._rewrite(event) for event in events]), events

    def flush(self) -> tuple[bytes, list[SSEEvent]]:
        """At the end of the upstream stream: the rest (an unfinished event is passed on as it is), and the
        events it completed."""
        events = self._framer.flush()
        out = b"".join([self._rewrite(event) for event in events])
        return out + self._framer.remainder, events

    @staticmethod
    def _rewrite(event: SSEEvent) -> bytes:
        raw = event.raw
        if b"usage" not in raw:
            return raw
        parts = _split_single_data_line(raw)
        if parts is None:
            return raw
        prefix, payload, terminator = parts
        # The usual chunk: a top-level object whose "usage":null is its last member (or followed only by
        # plain string members). Cut it without parsing: this runs for every event of the stream.
        if payload.startswith(b"{"):
            fast = _cut_trailing_null_usage(payload)
            if fast is not None:
                return prefix + fast + terminator
        try:
            chunk = json.loads(payload)
        except (ValueError, RecursionError):
            return raw
        if not isinstance(chunk, dict) or "usage" not in chunk:
            return raw
        usage = chunk["usage"]
        if isinstance(usage, dict) and chunk.get("choices") == []:
            return b""  # the usage-only chunk that include_usage added
        if usage is None and _NULL_MEMBER in payload:
            stripped = _without_null_usage(payload, chunk)
            if stripped is not None:
                return prefix + stripped + terminator
        return raw
