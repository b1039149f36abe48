"""Is the first event of a 200 stream an error? (sans-IO)

Providers report some failures in-band: the HTTP status is 200 and the first stream event is an error (an
overloaded Anthropic model sends ``event: error``; OpenAI-compatible servers send ``data: {"error": ...}``). The
forwarder holds the client's response head until the first upstream event so that such a stream can still be
retried on another key; this module decides, from bytes, when the first event is complete and whether it is an
error.
"""

from __future__ import annotations

import json

from trioproxy.snapshot import ProviderKind
from trioproxy.sse import SSEEvent, SSEFramer


class FirstEventProbe:
    """Feed the first bytes of an SSE body; ``verdict`` becomes True/False once the first data event is complete."""

    def __init__(self, kind: ProviderKind) -> None:
        self._kind = kind
        self._framer = SSEFramer()
        self.verdict: bool | None = None  # None: no complete data event yet; True: it is an error event

    def feed(self, data: bytes) -> bool | None:
        if self.verdict is None:
            for event in self._framer.feed(data):
                if event.has_data:
                    self.verdict = is_error_event(self._kind, event)
                    break
        return self.verdict


def is_error_event(kind: ProviderKind, event: SSEEvent) -> bool:
    """An in-band error event in the dialect of ``kind`` (Anthropic's ``event: error``, or an ``error`` object)."""
    if kind is ProviderKind.ANTHROPIC and event.event == "error":
        return True
    if '"error"' not in event.data:
        return False
    try:
        payload = json.loads(event.data)
    except ValueError:
        return False
    return (
        isinstance(payload, dict)
        and payload.get("error") is not None
        and (kind is not ProviderKind.ANTHROPIC or payload.get("type") == "error")
    )
