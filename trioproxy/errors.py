"""The rooted error hierarchy of trioproxy.

Every error we raise on purpose derives from :class:`TrioProxyError` and carries ``status_hint``: the HTTP status a
client should see when the error ends its request (the idea is h11's ``error_status_hint``). The hierarchy is flat on
purpose; callers catch the narrowest class they can handle.

Messages never contain secrets: provider keys, gateway keys and ``Authorization`` values are redacted before an
error is built.
"""

from __future__ import annotations


class TrioProxyError(Exception):
    """Root of every error trioproxy raises deliberately."""

    status_hint: int = 500

    def __init__(self, message: str, *, status_hint: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_hint is not None:
            self.status_hint = status_hint


class ConfigError(TrioProxyError):
    """Settings or stored configuration are invalid."""

    status_hint = 500


class ClientProtocolError(TrioProxyError):
    """The client sent something we refuse to parse (framing, limits, targets)."""

    status_hint = 400


class UpstreamConnectError(TrioProxyError):
    """Could not open (or TLS-handshake) a connection to the provider in time."""

    status_hint = 502


class UpstreamTimeoutError(TrioProxyError):
    """The provider did not answer, or stopped sending, within a deadline."""

    status_hint = 504


class UpstreamProtocolError(TrioProxyError):
    """The provider's bytes were not valid HTTP/1.1, or its response exceeded our limits."""

    status_hint = 502


class UpstreamDiedError(TrioProxyError):
    """The provider closed or broke the connection before the response body was complete."""

    status_hint = 502


class ClientGoneError(TrioProxyError):
    """The client disconnected before we finished answering (nginx's 499)."""

    status_hint = 499


class PoolClosedError(TrioProxyError):
    """The upstream connection pool is shutting down and takes no new requests."""

    status_hint = 503


class StoreError(TrioProxyError):
    """The database rejected or could not complete an operation."""

    status_hint = 500


class NotFoundError(StoreError):
    """A named object (provider, key, user) does not exist."""

    status_hint = 404


class ConflictError(StoreError):
    """A write collides with an existing object (duplicate name, foreign object in a pool)."""

    status_hint = 409


class ForbiddenError(TrioProxyError):
    """The caller may see the object but lacks the permission to do this to it."""

    status_hint = 403


class ValidationError(TrioProxyError):
    """A provisioning value is malformed (bad URL, unknown kind, negative weight)."""

    status_hint = 400
