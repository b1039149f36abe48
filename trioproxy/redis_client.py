"""The one way trioproxy opens a Redis client (coredis on trio), shared by the limits and the balancer.

coredis 6 opens a connection's six buffer streams in ``__init__`` but closes them only once connected: a failed
connect (Redis down: exactly the case the outage policies exist for) leaves them to the garbage collector, which
warns for each. :class:`_TCPConnection` closes them itself. This touches coredis internals, which is safe while
coredis stays pinned below 7 (pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import coredis
from coredis.connection import TCPConnection
from coredis.pool import ConnectionPool
from coredis.retry import NoRetryPolicy

_BUFFERS = (
    "_push_message_buffer_in",
    "_push_message_buffer_out",
    "_streamed_message_buffer_in",
    "_streamed_message_buffer_out",
    "_write_buffer_in",
    "_write_buffer_out",
)


class _TCPConnection(TCPConnection):
    async def _connect(self) -> Any:
        try:
            return await super()._connect()
        except BaseException:
            for name in _BUFFERS:
                stream = getattr(self, name, None)
                if stream is not None:
                    stream.close()
            raise


def redis_client(url: str, *, connect_timeout: float, stream_timeout: float) -> coredis.Redis[str]:
    """A client for ``url`` that connects lazily (an unreachable Redis shows on the first command) and never
    retries by itself: a script resent after a lost reply could apply twice, so callers own their retries."""
    pool = ConnectionPool.from_url(
        url, decode_responses=True, connect_timeout=connect_timeout, stream_timeout=stream_timeout
    )
    if pool.connection_class is TCPConnection:
        pool.connection_class = _TCPConnection
    return coredis.Redis(connection_pool=pool, decode_responses=True, retry_policy=NoRetryPolicy())
