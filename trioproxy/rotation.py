"""Plain rotation through a gateway key's pool of provider keys.

This is the data plane's selection until the balancing strategies arrive: one counter per gateway key (not per
path, the origin system's mistake), skipping disabled keys and keys that vanished from the snapshot. Pure code: the
caller passes the snapshot's views in; nothing here awaits.
"""

from __future__ import annotations

from collections.abc import Mapping

from trioproxy.snapshot import GatewayKeyView, ProviderKeyView


class PoolRotation:
    """Round-robin position per gateway key id."""

    def __init__(self) -> None:
        self._positions: dict[int, int] = {}

    def pick(
        self, gateway_key: GatewayKeyView, provider_keys: Mapping[int, ProviderKeyView]
    ) -> ProviderKeyView | None:
        """The next usable provider key of the pool, or None when no key of the pool is usable."""
        pool = gateway_key.pool
        if not pool:
            return None
        start = self._positions.get(gateway_key.id, 0)
        for offset in range(len(pool)):
            index = (start + offset) % len(pool)
            candidate = provider_keys.get(pool[index])
            if (
                candidate is not None
                and candidate.enabled
                and candidate.weight > 0
                and candidate.provider_id == gateway_key.provider_id
            ):
                self._positions[gateway_key.id] = index + 1
                return candidate
        return None

    def __repr__(self) -> str:
        return f"<PoolRotation pools={len(self._positions)}>"
