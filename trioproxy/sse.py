"""An incremental Server-Sent-Events framer (sans-IO).

The framer follows the WHATWG HTML "event stream interpretation" rules for lines and fields, with one
addition a proxy needs: every event keeps the exact bytes it was made of (``SSEEvent.raw``, up to and
including the blank line that ended it), so a caller can forward, rewrite or drop whole events byte-exactly.
Concatenating the ``raw`` of every event in order, followed by :attr:`SSEFramer.remainder`, gives back the
input unchanged.

Unlike an ``EventSource``, the framer reports *every* blank-line-terminated block, including blocks that an
``EventSource`` would not dispatch (comments only, ``event:`` without ``data:``, a lone blank line): a proxy
must forward those bytes too. ``is_comment_only`` and ``has_data`` tell the cases apart.

Error handling: an event (or the unterminated tail of the stream) longer than ``max_event_bytes`` raises
:class:`~trioproxy.errors.UpstreamProtocolError`, from the call that received its bytes, or, when that call
also completed earlier events, from the next call (the earlier events are returned first). Every later call
raises the same error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trioproxy.errors import UpstreamProtocolError

# A streamed chat chunk is a few hundred bytes to a few KiB; 1 MiB leaves two orders of magnitude of headroom
# and still stops an upstream that never sends a blank line from making us buffer without bound.
MAX_EVENT_BYTES = 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A
_EOL = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One blank-line-terminated block of an event stream.

    ``event`` is the last non-empty ``event:`` value (None means the default type, "message"); ``data`` is
    the ``data:`` values joined by "\\n"; ``id`` is the last ``id:`` value without a NUL; ``retry`` the last
    all-digit ``retry:`` value. ``is_comment_only`` is True when the block has no field line at all (only
    ``:`` comments, or nothing: a lone blank line). ``has_data`` is True when at least one ``data`` field was
    present, which is exactly when an ``EventSource`` would dispatch the event.
    """

    raw: bytes
    event: str | None = None
    data: str = ""
    id: str | None = None
    retry: int | None = None
    is_comment_only: bool = True
    has_data: bool = False


class SSEFramer:
    """Cuts a byte stream into :class:`SSEEvent` objects as the bytes arrive.

    ``feed()`` returns the events that the new bytes completed; ``flush()`` at the end of the stream
    completes a final line that ended in a bare CR (before EOF we cannot know whether an LF follows). The spec
    discards an unterminated final event; its bytes stay available as :attr:`remainder` so a proxy can still
    forward them.

    A line that ends in CR at the very end of the bytes seen so far is left unprocessed until the next byte
    arrives (it may be the first half of a CRLF). This keeps ``raw`` independent of how the stream was split;
    for LF and CRLF streams no complete event is ever held back.
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_data",
        "_error",
        "_event",
        "_first_line",
        "_has_data",
        "_has_field",
        "_id",
        "_max",
        "_pos",
        "_retry",
    )

    _data: list[str]
    _event: str | None
    _id: str | None
    _retry: int | None
    _has_field: bool
    _has_data: bool

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes of the current, not yet complete event
        self._pos = 0  # where the next line starts inside _buf
        self._first_line = True  # a BOM is only skipped at the start of the stream
        self._closed = False
        self._error: UpstreamProtocolError | None = None  # raised by the next call (see _over_limit)
        self._reset_fields()

    def __repr__(self) -> str:
        return f"<SSEFramer pending={len(self._buf)} closed={self._closed}>"

    @property
    def remainder(self) -> bytes:
        """The bytes received after the last complete event (an unfinished event)."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they completed, in order."""
        if self._closed:
            raise RuntimeError("SSEFramer.feed() after flush()")
        if self._error is not None:
            raise self._error
        if not data:
            return []
        self._buf += data
        return self._scan(final=False)

    def flush(self) -> list[SSEEvent]:
        """Signal the end of the stream; return an event completed by a final bare CR, if any."""
        if self._error is not None:
            raise self._error
        if self._closed:
            return []
        self._closed = True
        return self._scan(final=True)

    # -- internals --------------------------------------------------------------------------------------

    def _reset_fields(self) -> None:
        self._data = []
        self._event = None
        self._id = None
        self._retry = None
        self._has_field = False
        self._has_data = False

    def _scan(self, *, final: bool) -> list[SSEEvent]:
        buf = self._buf
        size = len(buf)
        events: list[SSEEvent] = []
        start = 0  # where the current event begins; consumed events are cut off once, at the end
        pos = self._pos
        while True:
            m = _EOL.search(buf, pos)
            if m is None:
                break
            eol = m.start()
            if buf[eol] == _CR:
                if eol + 1 == size and not final:
                    break  # maybe the first half of a CRLF: decide when the next byte arrives
                end = eol + 2 if eol + 1 < size and buf[eol + 1] == _LF else eol + 1
            else:
                end = eol + 1
            line = bytes(buf[pos:eol])
            pos = end
            if self._first_line:
                # One leading U+FEFF is ignored (WHATWG); it stays in ``raw``.
                self._first_line = False
                line = line.removeprefix(_BOM)
            if line:
                self._field(line)
                continue
            # A blank line ends the event.
            if end - start > self._max:
                return self._over_limit(events)
            events.append(
                SSEEvent(
                    raw=bytes(buf[start:end]),
                    event=self._event,
                    data="\n".join(self._data),
                    id=self._id,
                    retry=self._retry,
                    is_comment_only=not self._has_field,
                    has_data=self._has_data,
                )
            )
            start = end
            self._reset_fields()
        if start:
            del buf[:start]
        self._pos = pos - start
        if len(buf) > self._max:
            return self._over_limit(events)
        return events

    def _over_limit(self, events: list[SSEEvent]) -> list[SSEEvent]:
        # Events completed before the oversized one are still returned, so that what a caller sees does not
        # depend on how the stream was split; the error then comes from the next call.
        self._error = UpstreamProtocolError(f"server-sent event larger than {self._max} bytes")
        if events:
            return events
        raise self._error

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        self._has_field = True
        name_b, colon, value_b = line.partition(b":")
        if colon and value_b[:1] == b" ":
            value_b = value_b[1:]
        name = name_b.decode("utf-8", "replace")
        value = value_b.decode("utf-8", "replace")
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
