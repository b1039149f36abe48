"""Token usage read from a provider's response body as it streams past (sans-IO).

:class:`UsageMeter` sees the response body bytes in arrival order (HTTP framing and content-encoding already
removed) and, at the end, answers one :class:`~trioproxy.records.Usage`. It never raises on what the provider
sent: bad JSON, unknown shapes, truncated streams and oversized bodies all end in a ``Usage`` that says what
could be read (``reported``) and whether the dialect's terminal marker arrived (``complete``).

Wire facts, per provider (``Usage.input_tokens`` excludes cache reads everywhere):

* OpenAI chat/completions and embeddings: ``usage.prompt_tokens`` includes
  ``prompt_tokens_details.cached_tokens``; ``completion_tokens`` includes
  ``completion_tokens_details.reasoning_tokens``. A stream carries usage in one last chunk with
  ``choices: []`` (only with ``stream_options.include_usage``) and ends with ``data: [DONE]``.
  /v1/responses: ``usage.input_tokens`` includes ``input_tokens_details.cached_tokens``; ``output_tokens``
  includes ``output_tokens_details.reasoning_tokens``; the stream's ``response.completed`` (or
  ``response.incomplete``) event carries ``response.usage`` and ends the stream. The shape is detected from
  the payload, not from the route.
* Anthropic: ``message_start.message.usage`` then ``message_delta.usage``, whose counts are cumulative: a
  later value replaces an earlier one, never adds to it. ``input_tokens`` already excludes the cache fields.
  ``message_stop`` ends the stream; an ``error`` event means it did not complete.
* Gemini: every chunk may carry ``usageMetadata``; the last one wins. ``promptTokenCount`` includes
  ``cachedContentTokenCount``; ``thoughtsTokenCount`` is billed as output and is not part of
  ``candidatesTokenCount``; ``toolUsePromptTokenCount`` counts as input. A ``finishReason`` on the last
  chunk's candidates (or a ``promptFeedback.blockReason``) ends the stream.

Resource handling: SSE events are cut by :class:`~trioproxy.sse.SSEFramer` and only events that can carry
usage (a cheap substring test on their bytes) are JSON-parsed. A whole JSON body, one SSE event and one JSON
array element are each buffered up to ``max_buffer`` bytes; past that the meter stops reading and keeps what
it had.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from trioproxy.errors import UpstreamProtocolError
from trioproxy.records import Usage
from trioproxy.snapshot import ProviderKind
from trioproxy.sse import SSEEvent, SSEFramer

# Same as UpstreamSettings.max_response_body_bytes: the largest non-streamed body the proxy accepts at all.
DEFAULT_MAX_BUFFER = 64 * 1024 * 1024


class StreamFormat(enum.StrEnum):
    """How a response body is framed; the caller picks it from the response's Content-Type."""

    JSON = "json"  # one whole (non-streamed) JSON body
    SSE = "sse"  # text/event-stream
    JSON_ARRAY = "json_array"  # Gemini streamGenerateContent without alt=sse: "[{...}\r\n,{...}\r\n]"


@dataclass(slots=True)
class _Tally:
    """The counts seen so far, in Usage's conventions."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0
    reported: bool = False
    complete: bool = False
    errored: bool = False
    model: str | None = None

    def result(self) -> Usage:
        return Usage(
            input_tokens=self.input,
            output_tokens=self.output,
            cache_read_tokens=self.cache_read,
            cache_write_tokens=self.cache_write,
            reasoning_tokens=self.reasoning,
            reported=self.reported,
            complete=self.complete and not self.errored,
            response_model=self.model,
        )


def _count(value: Any) -> int | None:
    """A token count, or None for anything that is not a non-negative integer (bools, floats, nulls, text)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _nested(obj: dict[str, Any], outer: str, inner: str) -> int:
    details = _dict(obj.get(outer))
    return (_count(details.get(inner)) or 0) if details is not None else 0


def _take_model(tally: _Tally, value: Any) -> None:
    if isinstance(value, str) and value:
        tally.model = value


# -- OpenAI ---------------------------------------------------------------------------------------------


def _openai_usage(tally: _Tally, usage: dict[str, Any]) -> None:
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # chat/completions, completions, embeddings
        prompt = _count(usage.get("prompt_tokens"))
        cached = _nested(usage, "prompt_tokens_details", "cached_tokens")
        output = _count(usage.get("completion_tokens"))
        reasoning = _nested(usage, "completion_tokens_details", "reasoning_tokens")
    else:  # /v1/responses
        prompt = _count(usage.get("input_tokens"))
        cached = _nested(usage, "input_tokens_details", "cached_tokens")
        output = _count(usage.get("output_tokens"))
        reasoning = _nested(usage, "output_tokens_details", "reasoning_tokens")
    if prompt is None and output is None:
        return  # not a usage object we understand: nothing was reported
    prompt = prompt or 0
    cached = min(cached, prompt)
    tally.input = prompt - cached
    tally.cache_read = cached
    tally.cache_write = 0
    tally.output = output or 0
    tally.reasoning = reasoning
    tally.reported = True


# Responses API events that end a stream with the response's final usage.
_OPENAI_DONE_EVENTS = frozenset({"response.completed", "response.incomplete"})
_OPENAI_ERROR_EVENTS = frozenset({"error", "response.failed"})
_OPENAI_MARKERS = (b'"error"', b"response.completed", b"response.incomplete", b"response.failed")


def _openai_object(tally: _Tally, obj: dict[str, Any]) -> None:
    target = obj
    kind = obj.get("type")
    if isinstance(kind, str):
        if kind in _OPENAI_ERROR_EVENTS:
            tally.errored = True
        elif kind in _OPENAI_DONE_EVENTS:
            tally.complete = True
        inner = _dict(obj.get("response"))
        if kind.startswith("response.") and inner is not None:
            target = inner
    if _dict(obj.get("error")) is not None:  # a chat/completions stream's in-band error chunk
        tally.errored = True
    _take_model(tally, target.get("model"))
    usage = _dict(target.get("usage"))
    if usage is not None:
        _openai_usage(tally, usage)


def _openai_event(tally: _Tally, event: SSEEvent) -> None:
    if event.data == "[DONE]":
        tally.complete = True
        return
    raw = event.raw
    # Every chat chunk carries "usage":null once include_usage is on; parse only chunks with more than that.
    wanted = (b"usage" in raw and raw.count(b"usage") != raw.count(b'"usage":null')) or any(
        marker in raw for marker in _OPENAI_MARKERS
    )
    if wanted:
        obj = _loads_dict(event.data)
        if obj is not None:
            _openai_object(tally, obj)


# -- Anthropic ------------------------------------------------------------------------------------------

_ANTHROPIC_FIELDS = (
    ("input_tokens", "input"),
    ("cache_creation_input_tokens", "cache_write"),
    ("cache_read_input_tokens", "cache_read"),
    ("output_tokens", "output"),
)


def _anthropic_usage(tally: _Tally, usage: dict[str, Any]) -> None:
    # Counts are cumulative: each present value replaces the one before (message_delta may repeat input and
    # cache fields, sometimes as null, which must not erase the message_start values).
    for key, attr in _ANTHROPIC_FIELDS:
        value = _count(usage.get(key))
        if value is not None:
            setattr(tally, attr, value)
            tally.reported = True


def _anthropic_object(tally: _Tally, obj: dict[str, Any], kind: Any) -> None:
    if kind == "message_start":
        message = _dict(obj.get("message"))
        if message is not None:
            _take_model(tally, message.get("model"))
            usage = _dict(message.get("usage"))
            if usage is not None:
                _anthropic_usage(tally, usage)
    elif kind == "message_delta":
        usage = _dict(obj.get("usage"))
        if usage is not None:
            _anthropic_usage(tally, usage)
    elif kind == "message_stop":
        tally.complete = True
    elif kind == "error":
        tally.errored = True
    elif kind == "message":  # a whole non-streamed body
        _take_model(tally, obj.get("model"))
        usage = _dict(obj.get("usage"))
        if usage is not None:
            _anthropic_usage(tally, usage)


_ANTHROPIC_PARSED = frozenset({"message_start", "message_delta", "message_stop", "error"})


def _anthropic_event(tally: _Tally, event: SSEEvent) -> None:
    name = event.event
    if name == "message_stop":
        tally.complete = True
    elif name == "error":
        tally.errored = True
    elif name in _ANTHROPIC_PARSED or (
        name is None and (b"message_" in event.raw or b'"error"' in event.raw)
    ):
        # Without an event: line (some compatible servers), the data's own "type" names the event.
        obj = _loads_dict(event.data)
        if obj is not None:
            _anthropic_object(tally, obj, obj.get("type") if name is None else name)


def _anthropic_body(tally: _Tally, obj: dict[str, Any]) -> None:
    # count_tokens answers {"input_tokens": N}: an estimate, not billable usage, so it is not "message".
    _anthropic_object(tally, obj, obj.get("type"))


# -- Gemini ---------------------------------------------------------------------------------------------


_GEMINI_COUNTS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "toolUsePromptTokenCount")


def _gemini_object(tally: _Tally, obj: dict[str, Any]) -> None:
    if _dict(obj.get("error")) is not None:
        tally.errored = True
        return
    _take_model(tally, obj.get("modelVersion"))
    meta = _dict(obj.get("usageMetadata"))
    if meta is not None and any(_count(meta.get(key)) is not None for key in _GEMINI_COUNTS):
        prompt = _count(meta.get("promptTokenCount")) or 0
        cached = min(_count(meta.get("cachedContentTokenCount")) or 0, prompt)
        tool = _count(meta.get("toolUsePromptTokenCount")) or 0
        thoughts = _count(meta.get("thoughtsTokenCount")) or 0
        tally.input = prompt - cached + tool
        tally.cache_read = cached
        tally.cache_write = 0
        tally.output = (_count(meta.get("candidatesTokenCount")) or 0) + thoughts
        tally.reasoning = thoughts
        tally.reported = True
    candidates = obj.get("candidates")
    if isinstance(candidates, list) and candidates:
        tally.complete = any(
            isinstance(c, dict) and c.get("finishReason") not in (None, "", "FINISH_REASON_UNSPECIFIED")
            for c in candidates
        )
    feedback = _dict(obj.get("promptFeedback"))
    if feedback is not None and feedback.get("blockReason"):
        tally.complete = True  # a blocked prompt is answered with no candidates at all


_GEMINI_MARKERS = (b"usageMetadata", b"finishReason", b"blockReason", b'"error"', b"modelVersion")


def _gemini_event(tally: _Tally, event: SSEEvent) -> None:
    if any(marker in event.raw for marker in _GEMINI_MARKERS):
        obj = _loads_dict(event.data)
        if obj is not None:
            _gemini_object(tally, obj)


# -- parsing helpers ------------------------------------------------------------------------------------


def _loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    # What orjson refuses and the standard library reads (integers beyond 64 bits, lone surrogates): rare, so
    # the slow parser only runs then.
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def _loads_dict(data: str | bytes) -> dict[str, Any] | None:
    return _dict(_loads(data))


_IN_STRING = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'[\[\]{}"]')
_JSON_SPACE = b" \t\r\n"


class _ArraySplitter:
    """Cuts a streamed JSON array (``[{...},{...}]``) into its elements' bytes without parsing them.

    It tracks nesting depth and string/escape state across feeds, so only the current element is buffered.
    Anything that is not an array of objects and arrays makes it ``broken`` (it then ignores all input).
    """

    __slots__ = ("_buf", "_depth", "_escape", "_in_string", "_max", "_state")

    _BEFORE, _BETWEEN, _INSIDE, _AFTER, _BROKEN = range(5)

    def __init__(self, max_element: int) -> None:
        self._max = max_element
        self._state = self._BEFORE
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False

    @property
    def broken(self) -> bool:
        return self._state == self._BROKEN

    def feed(self, data: bytes) -> list[bytes]:
        elements: list[bytes] = []
        i, n = 0, len(data)
        while i < n and self._state != self._BROKEN:
            if self._state == self._INSIDE:
                end = self._scan(data, i)
                if end < 0:
                    if len(self._buf) + n - i > self._max:
                        self._break()
                    else:
                        self._buf += data[i:]
                    break
                if len(self._buf) + end - i > self._max:
                    self._break()
                    break
                self._buf += data[i:end]
                elements.append(bytes(self._buf))
                self._buf.clear()
                self._state = self._BETWEEN
                i = end
                continue
            c = data[i]
            if c in _JSON_SPACE:
                i += 1
            elif self._state == self._BEFORE and c == 0x5B:  # "["
                self._state = self._BETWEEN
                i += 1
            elif self._state == self._BETWEEN and c == 0x2C:  # ","
                i += 1
            elif self._state == self._BETWEEN and c == 0x5D:  # "]"
                self._state = self._AFTER
                i += 1
            elif self._state == self._BETWEEN and c in b"{[":
                self._state = self._INSIDE  # _scan counts this opening bracket
            else:
                self._break()
        return elements

    def _break(self) -> None:
        self._state = self._BROKEN
        self._buf = bytearray()

    def _scan(self, data: bytes, i: int) -> int:
        """Advance through one element; return the index just past its closing bracket, or -1."""
        n = len(data)
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                m = _IN_STRING.search(data, i)
                if m is None:
                    return -1
                i = m.end()
                if data[m.start()] == 0x5C:  # backslash: the next byte is escaped, maybe in the next feed
                    self._escape = True
                else:
                    self._in_string = False
                continue
            m = _STRUCTURE.search(data, i)
            if m is None:
                return -1
            i = m.end()
            c = data[m.start()]
            if c == 0x22:  # '"'
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return i
        return -1


# -- the meter ------------------------------------------------------------------------------------------

_EVENT_HANDLERS: dict[ProviderKind, Callable[[_Tally, SSEEvent], None]] = {
    ProviderKind.OPENAI: _openai_event,
    ProviderKind.ANTHROPIC: _anthropic_event,
    ProviderKind.GEMINI: _gemini_event,
}
_OBJECT_HANDLERS: dict[ProviderKind, Callable[[_Tally, dict[str, Any]], None]] = {
    ProviderKind.OPENAI: _openai_object,
    ProviderKind.ANTHROPIC: _anthropic_body,
    ProviderKind.GEMINI: _gemini_object,
}


class UsageMeter:
    """Reads one response body's token usage as it streams; see the module docstring for the wire facts.

    ``feed()`` takes body bytes in arrival order; ``finish()`` (once, at the end, whether the body completed
    or not) returns the :class:`~trioproxy.records.Usage`. Neither raises because of what the provider sent.
    """

    __slots__ = (
        "_array",
        "_body",
        "_fmt",
        "_framer",
        "_gave_up",
        "_kind",
        "_max",
        "_result",
        "_tally",
        "generated_chars",
    )

    def __init__(
        self,
        kind: ProviderKind,
        fmt: StreamFormat,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        framed_elsewhere: bool = False,
    ) -> None:
        self._kind = ProviderKind(kind)
        self._fmt = StreamFormat(fmt)
        self._max = max_buffer
        self._tally = _Tally()
        self._gave_up = False  # too large or unparseable framing: stop reading, keep what we have
        self._result: Usage | None = None
        self._body = bytearray()
        # An SSE event may be a whole Responses-API response (response.completed), so the per-event cap is
        # the body cap rather than the framer's 1 MiB default.
        sse_here = self._fmt is StreamFormat.SSE and not framed_elsewhere
        self._framer = SSEFramer(max_event_bytes=max_buffer) if sse_here else None
        self._array = _ArraySplitter(max_buffer) if self._fmt is StreamFormat.JSON_ARRAY else None
        # Characters of generated text seen in stream events (escaped JSON length): the basis of an output
        # estimate when a stream breaks off before the provider reported its usage.
        self.generated_chars = 0

    def __repr__(self) -> str:
        return f"<UsageMeter {self._kind.value}/{self._fmt.value} gave_up={self._gave_up}>"

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the response body."""
        if self._result is not None:
            raise RuntimeError("UsageMeter.feed() after finish()")
        if self._gave_up or not data:
            return
        if self._framer is not None:
            try:
                events = self._framer.feed(data)
            except UpstreamProtocolError:
                self._give_up()
                return
            self._on_events(events)
        elif self._array is not None:
            for element in self._array.feed(data):
                self._on_object(_loads(element))
            if self._array.broken:
                self._give_up()
        elif len(self._body) + len(data) > self._max:
            self._give_up()
        else:
            self._body += data

    def feed_events(self, events: list[SSEEvent]) -> None:
        """Take SSE events framed elsewhere (by the usage-chunk stripper, so an OpenAI stream is framed once).
        For a meter made with ``framed_elsewhere=True``, instead of :meth:`feed`."""
        if self._result is not None:
            raise RuntimeError("UsageMeter.feed_events() after finish()")
        if not self._gave_up:
            self._on_events(events)

    def finish(self) -> Usage:
        """The usage read from the body; call at the end. Later calls return the same value."""
        if self._result is None:
            if not self._gave_up:
                if self._framer is not None:
                    # An oversized last event: the events before it were already counted.
                    with contextlib.suppress(UpstreamProtocolError):
                        self._on_events(self._framer.flush())
                elif self._fmt is StreamFormat.JSON and self._body:
                    obj = _loads(bytes(self._body))
                    if obj is not None:
                        for item in obj if isinstance(obj, list) else (obj,):  # a list: Gemini's array
                            self._on_object(item)
                        # A whole parsed body is a complete answer, even when it is an error body.
                        self._tally.complete = True
                        self._tally.errored = False
            self._body = bytearray()
            self._result = self._tally.result()
        return self._result

    def _give_up(self) -> None:
        self._gave_up = True
        self._body = bytearray()
        self._framer = None
        self._array = None

    def _on_events(self, events: list[SSEEvent]) -> None:
        handler = _EVENT_HANDLERS[self._kind]
        for event in events:
            if event.has_data:
                self.generated_chars += _generated_text_length(event.data)
                handler(self._tally, event)

    def _on_object(self, obj: Any) -> None:
        if isinstance(obj, dict):
            _OBJECT_HANDLERS[self._kind](self._tally, obj)


# String values that carry generated text in the three dialects' stream events: OpenAI chat deltas
# ("content", tool "arguments"), the Responses API's "delta", Anthropic's "text" / "thinking" / "partial_json",
# Gemini's parts' "text". A regex over the raw event is far cheaper than parsing every event's JSON.
_GENERATED_TEXT = re.compile(r'"(?:content|text|thinking|partial_json|arguments|delta)":"((?:[^"\\]|\\.)*)"')


def _generated_text_length(data: str) -> int:
    return sum(len(match) for match in _GENERATED_TEXT.findall(data))
