"""Build the data plane's :class:`~trioproxy.snapshot.Snapshot` from the store.

:func:`read_config_version` is the reloader's cheap poll; :func:`load_snapshot` reads everything in one read
transaction (REPEATABLE READ on PostgreSQL, one WAL snapshot on SQLite), so the snapshot matches the version
it carries exactly. Secrets are decrypted here, once per reload, never per request.

Folding rules: a gateway key is enabled only if the key, its owner (if any) and its provider are all enabled,
and the owner's role may use the provider's kind (:func:`trioproxy.roles.may_use_kind`: demoting a user stops
their keys like disabling them does); a provider key is enabled only if it and its owner (if any) are. A pool
lists provider key ids in position order and leaves out any key of another provider and any key of another
owner (only shared keys and the gateway key owner's own may serve it; an unowned gateway key may use any).
The write path refuses those already; a hand-edited database must not route a key's traffic to the wrong
provider or spend someone else's provider key.

Error handling: a secret that does not decrypt (wrong master key) raises
:class:`~trioproxy.errors.ConfigError` naming the key's id only; the caller keeps its previous snapshot.
"""

from __future__ import annotations

from typing import cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from trioproxy.crypto import PROVIDER_KEY_AAD, SecretBox
from trioproxy.errors import ConfigError, StoreError, TrioProxyError
from trioproxy.pricing import PriceTable
from trioproxy.roles import may_use_kind
from trioproxy.settings import UpstreamSettings
from trioproxy.snapshot import (
    GatewayKeyView,
    ProviderKeyView,
    ProviderKind,
    ProviderView,
    Snapshot,
    UserLimitsView,
)
from trioproxy.ssrf import parse_base_url
from trioproxy.store.db import read_transaction
from trioproxy.store.models import ConfigVersion, GatewayKey, GatewayKeyPool, Provider, ProviderKey, User
from trioproxy.store.prices import load_prices

_VERSION = cast(sa.Table, ConfigVersion.__table__)
_USERS = cast(sa.Table, User.__table__)
_PROVIDERS = cast(sa.Table, Provider.__table__)
_PROVIDER_KEYS = cast(sa.Table, ProviderKey.__table__)
_GATEWAY_KEYS = cast(sa.Table, GatewayKey.__table__)
_POOL = cast(sa.Table, GatewayKeyPool.__table__)


def read_config_version(engine: Engine) -> int:
    """The current configuration version (one primary-key read)."""
    with engine.connect() as conn:
        version = conn.execute(sa.select(_VERSION.c.version).where(_VERSION.c.id == 1)).scalar_one_or_none()
    if version is None:
        raise StoreError("the config_version row is missing; run `trioproxy migrate`")
    return int(version)


def load_snapshot(engine: Engine, box: SecretBox, defaults: UpstreamSettings) -> Snapshot:
    """Read the whole configuration in one transaction and return it as frozen views."""
    with read_transaction(engine) as conn:
        version = conn.execute(sa.select(_VERSION.c.version).where(_VERSION.c.id == 1)).scalar_one_or_none()
        if version is None:
            raise StoreError("the config_version row is missing; run `trioproxy migrate`")
        user_rows = conn.execute(sa.select(_USERS.c.id, _USERS.c.enabled, _USERS.c.role)).all()
        user_enabled = {row.id: bool(row.enabled) for row in user_rows}
        user_role = {row.id: row.role for row in user_rows}
        users = [
            UserLimitsView(id=row.id, budget=row.budget, budget_period=row.budget_period)
            for row in conn.execute(
                sa.select(_USERS.c.id, _USERS.c.budget, _USERS.c.budget_period).where(
                    _USERS.c.budget.is_not(None)
                )
            )
        ]
        providers = [_provider_view(row, defaults) for row in conn.execute(sa.select(_PROVIDERS)).mappings()]
        provider_keys = [
            _provider_key_view(row, box, user_enabled)
            for row in conn.execute(sa.select(_PROVIDER_KEYS)).mappings()
        ]
        pools: dict[int, list[int]] = {}
        for gateway_key_id, provider_key_id in conn.execute(
            sa.select(_POOL.c.gateway_key_id, _POOL.c.provider_key_id).order_by(
                _POOL.c.gateway_key_id, _POOL.c.position, _POOL.c.provider_key_id
            )
        ):
            pools.setdefault(gateway_key_id, []).append(provider_key_id)
        gateway_rows = conn.execute(sa.select(_GATEWAY_KEYS)).mappings().all()
        prices = PriceTable(load_prices(conn))

    provider_by_id = {provider.id: provider for provider in providers}
    key_by_id = {key.id: key for key in provider_keys}
    gateway_keys: dict[str, GatewayKeyView] = {}
    for row in gateway_rows:
        provider = provider_by_id.get(row["provider_id"])
        owner = row["owner_id"]
        owner_ok = owner is None or (
            user_enabled.get(owner, False)
            and provider is not None
            and may_use_kind(user_role.get(owner, ""), provider.kind)
        )
        pool = tuple(
            pk
            for pk in pools.get(row["id"], ())
            if (key := key_by_id.get(pk)) is not None
            and key.provider_id == row["provider_id"]
            and (owner is None or key.owner_id is None or key.owner_id == owner)
        )
        expires_at = row["expires_at"]
        gateway_keys[row["key_hash"]] = GatewayKeyView(
            id=row["id"],
            name=row["name"],
            owner_id=row["owner_id"],
            provider_id=row["provider_id"],
            prefix=row["key_prefix"],
            pool=pool,
            strategy=row["strategy"],
            retry_count=row["retry_count"],
            allowed_models=None if row["allowed_models"] is None else tuple(row["allowed_models"]),
            expires_at=None if expires_at is None else expires_at.timestamp(),
            enabled=bool(row["enabled"]) and bool(owner_ok) and provider is not None and provider.enabled,
            first_byte_timeout=row["first_byte_timeout"],
            total_timeout=row["total_timeout"],
            rpm_limit=row["rpm_limit"],
            tpm_limit=row["tpm_limit"],
            rpd_limit=row["rpd_limit"],
            daily_token_limit=row["daily_token_limit"],
            daily_cost_limit=row["daily_cost_limit"],
            budget=row["budget"],
            budget_period=row["budget_period"],
            max_concurrency=row["max_concurrency"],
        )
    return Snapshot.build(int(version), providers, provider_keys, gateway_keys, prices, users)


def _provider_view(row: sa.RowMapping, defaults: UpstreamSettings) -> ProviderView:
    try:
        # The SSRF guard ran when the URL was saved and runs again on every connect (on the resolved address).
        base = parse_base_url(row["base_url"], allow_private=True)
        kind = ProviderKind(row["kind"])
    except (TrioProxyError, ValueError) as exc:
        raise ConfigError(f"provider {row['id']} has an invalid stored base URL or kind") from exc

    def pick(name: str) -> float:
        value = row[name]
        return float(value) if value is not None else float(getattr(defaults, name))

    return ProviderView(
        id=row["id"],
        name=row["name"],
        kind=kind,
        origin=base.origin,
        path_prefix=base.path_prefix,
        extra_headers=tuple((row["headers"] or {}).items()),
        connect_timeout=pick("connect_timeout"),
        first_byte_timeout=pick("first_byte_timeout"),
        idle_timeout=pick("idle_timeout"),
        total_timeout=pick("total_timeout"),
        enabled=bool(row["enabled"]),
    )


def _provider_key_view(row: sa.RowMapping, box: SecretBox, user_enabled: dict[int, bool]) -> ProviderKeyView:
    try:
        secret = box.decrypt(row["secret_ciphertext"], associated_data=PROVIDER_KEY_AAD)
    except ConfigError as exc:
        raise ConfigError(f"provider key {row['id']}: {exc.message}") from None
    owner_ok = row["owner_id"] is None or user_enabled.get(row["owner_id"], False)
    return ProviderKeyView(
        id=row["id"],
        name=row["name"],
        provider_id=row["provider_id"],
        owner_id=row["owner_id"],
        secret=secret,
        weight=row["weight"],
        enabled=bool(row["enabled"]) and bool(owner_ok),
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        rpd_limit=row["rpd_limit"],
    )
