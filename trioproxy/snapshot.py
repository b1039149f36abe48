"""The data plane's immutable view of the configuration.

The proxy never reads the database on the hot path. The config reloader builds a :class:`Snapshot` from the store
whenever the stored config version changes and swaps it in atomically (a single attribute assignment); a request
takes the snapshot once when it starts and keeps it to the end, so an edit never changes a request in flight.

Everything here is plain, frozen data: secrets are already decrypted, URLs already split, disabled owners already
folded into ``GatewayKeyView.enabled``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioproxy.pricing import PriceTable


class ProviderKind(enum.StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a provider lives: the pool keys connections by this."""

    scheme: str  # "http" or "https"
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literals are bracketed
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProviderView:
    id: int
    name: str
    kind: ProviderKind
    origin: Origin
    path_prefix: str  # "" or "/api": put before every route path
    extra_headers: tuple[tuple[str, str], ...]
    connect_timeout: float
    first_byte_timeout: float
    idle_timeout: float
    total_timeout: float
    enabled: bool


@dataclass(frozen=True, slots=True)
class ProviderKeyView:
    id: int
    name: str
    provider_id: int
    owner_id: int | None
    secret: str = field(repr=False)
    weight: int
    enabled: bool
    # The provider's own published limits for this key (None: unknown); the limiter keeps the key under them.
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    rpd_limit: int | None = None


@dataclass(frozen=True, slots=True)
class GatewayKeyView:
    id: int
    name: str
    owner_id: int | None
    provider_id: int
    prefix: str  # the displayable start of the key, safe to log
    pool: tuple[int, ...]  # provider key ids, in a stable order
    strategy: str
    retry_count: int
    allowed_models: tuple[str, ...] | None  # None: any model
    expires_at: float | None  # unix time
    enabled: bool  # False also when the owner is disabled
    # Overrides of the provider's timeouts; None keeps the provider's.
    first_byte_timeout: float | None = None
    total_timeout: float | None = None
    # Limits (trioproxy.limits); None means unlimited. Money in USD; budget_period daily/weekly/monthly or None
    # for a budget that never resets.
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    rpd_limit: int | None = None
    daily_token_limit: int | None = None
    daily_cost_limit: Decimal | None = None
    budget: Decimal | None = None
    budget_period: str | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class UserLimitsView:
    """A user's budget across all of their gateway keys (only users that have one are in the snapshot)."""

    id: int
    budget: Decimal
    budget_period: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    providers: Mapping[int, ProviderView]
    provider_keys: Mapping[int, ProviderKeyView]
    gateway_keys: Mapping[str, GatewayKeyView]  # by SHA-256 hex digest of the full key
    prices: PriceTable
    users: Mapping[int, UserLimitsView] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(
        cls,
        version: int,
        providers: list[ProviderView],
        provider_keys: list[ProviderKeyView],
        gateway_keys: Mapping[str, GatewayKeyView],
        prices: PriceTable,
        users: list[UserLimitsView] | None = None,
    ) -> Snapshot:
        return cls(
            version=version,
            providers=MappingProxyType({p.id: p for p in providers}),
            provider_keys=MappingProxyType({k.id: k for k in provider_keys}),
            gateway_keys=MappingProxyType(dict(gateway_keys)),
            prices=prices,
            users=MappingProxyType({u.id: u for u in users or ()}),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled for the workers of a group, which receive their snapshots from the supervisor (mapping
        # proxies do not pickle: the plain mappings travel and are wrapped again on arrival).
        return (
            Snapshot.build,
            (
                self.version,
                list(self.providers.values()),
                list(self.provider_keys.values()),
                dict(self.gateway_keys),
                self.prices,
                list(self.users.values()),
            ),
        )
