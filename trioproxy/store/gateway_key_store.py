"""Gateway keys in the service layer: create, read, change, regenerate, delete, each scoped and audited.

The rules of :mod:`trioproxy.store.provisioning` hold here too (one transaction, one config-version bump, one
audit row per write; JSON views without secrets). What is particular to gateway keys:

* the full key exists only in the answers of :func:`create_gateway_key` and :func:`regenerate_gateway_key`,
  under ``"key"``; the database keeps its SHA-256 and a display prefix;
* the pool may only hold keys of the gateway key's own provider that its owner may use: the owner's own keys
  and shared keys (``owner_id`` NULL); a gateway key without an owner (made by the CLI) may pool any key of its
  provider. The snapshot loader applies the same rule to whatever the database holds;
* limits and budgets restrict what a key may spend, so only an actor who manages every tenant may set them:
  otherwise a user could lift the budget an administrator gave them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from trioproxy.errors import ConflictError, ForbiddenError, NotFoundError, ValidationError
from trioproxy.gateway_keys import display_prefix, generate_gateway_key, hash_gateway_key
from trioproxy.store import validation as check
from trioproxy.store.actor import SYSTEM, Actor, audit, check_changeable, check_visible, owned_page
from trioproxy.store.db import config_session
from trioproxy.store.lookups import (
    Ref,
    check_owner,
    flush_unique,
    get_provider_key_row,
    get_provider_row,
    reject_unknown,
)
from trioproxy.store.models import GatewayKey, GatewayKeyPool, Provider, ProviderKey, utcnow
from trioproxy.store.validation import gateway_key_to_json

LIMIT_FIELDS = frozenset(
    {
        "rpm_limit",
        "tpm_limit",
        "rpd_limit",
        "daily_token_limit",
        "daily_cost_limit",
        "budget",
        "budget_period",
        "max_concurrency",
    }
)
_MONEY_LIMITS = frozenset({"daily_cost_limit", "budget"})
_SETTINGS = frozenset(
    {
        "name",
        "provider_key_ids",
        "strategy",
        "retry_count",
        "first_byte_timeout",
        "total_timeout",
        "allowed_models",
        "expires_at",
        "enabled",
    }
)


def usable_by(owner_id: int | None, key_owner_id: int | None) -> bool:
    """Whether a gateway key owned by ``owner_id`` may pool a provider key owned by ``key_owner_id``."""
    return owner_id is None or key_owner_id is None or key_owner_id == owner_id


# --- helpers ------------------------------------------------------------------------------------------------


def _get(session: Session, gateway_key_id: int) -> GatewayKey:
    key = session.get(GatewayKey, gateway_key_id)
    if key is None:
        raise NotFoundError(f"gateway key {gateway_key_id} not found")
    return key


def _pool(session: Session, gateway_key_id: int) -> list[tuple[int, str]]:
    stmt = (
        sa.select(ProviderKey.id, ProviderKey.name)
        .join(GatewayKeyPool, GatewayKeyPool.provider_key_id == ProviderKey.id)
        .where(GatewayKeyPool.gateway_key_id == gateway_key_id)
        .order_by(GatewayKeyPool.position)
    )
    return [(row[0], row[1]) for row in session.execute(stmt)]


def _view(session: Session, key: GatewayKey, provider_name: str | None = None) -> dict[str, Any]:
    if provider_name is None:
        provider_name = get_provider_row(session, key.provider_id).name
    pool = _pool(session, key.id)
    return gateway_key_to_json(key, provider_name, [n for _, n in pool], [i for i, _ in pool])


def _resolve_pool(
    session: Session, actor: Actor, provider: Provider, owner_id: int | None, refs: Sequence[Ref] | None
) -> list[ProviderKey]:
    """The pool's keys in order: each of ``provider`` and usable by ``owner_id``.

    ``None`` means every key of the provider the owner may use, in creation order. A key the actor may not
    even see answers NotFoundError (no existence oracle); a visible key of another provider or owner answers
    ConflictError.
    """
    if refs is None:
        stmt = sa.select(ProviderKey).where(ProviderKey.provider_id == provider.id).order_by(ProviderKey.id)
        return [key for key in session.scalars(stmt) if usable_by(owner_id, key.owner_id)]
    keys: list[ProviderKey] = []
    for ref in refs:
        if isinstance(ref, int):
            key = get_provider_key_row(session, ref, provider=None)
        else:
            found = session.scalars(
                sa.select(ProviderKey).where(ProviderKey.name == ref.strip()).order_by(ProviderKey.id)
            ).all()
            if not found:
                raise NotFoundError(f"provider key {ref!r} not found")
            own = [candidate for candidate in found if candidate.provider_id == provider.id]
            key = own[0] if own else found[0]
        if key.owner_id is not None and not actor.can_see(key.owner_id):
            raise NotFoundError(f"provider key {ref!r} not found")
        if key.provider_id != provider.id:
            raise ConflictError(f"provider key {ref!r} belongs to another provider than {provider.name!r}")
        if not usable_by(owner_id, key.owner_id):
            raise ConflictError(f"provider key {ref!r} belongs to another owner than the gateway key's")
        if all(existing.id != key.id for existing in keys):
            keys.append(key)
    return keys


def _write_pool(session: Session, gateway_key_id: int, keys: Sequence[ProviderKey]) -> None:
    session.execute(sa.delete(GatewayKeyPool).where(GatewayKeyPool.gateway_key_id == gateway_key_id))
    session.add_all(
        GatewayKeyPool(gateway_key_id=gateway_key_id, provider_key_id=key.id, position=position)
        for position, key in enumerate(keys)
    )


def _check_limits(actor: Actor, limits: Mapping[str, Any]) -> dict[str, Any]:
    reject_unknown(limits, LIMIT_FIELDS, "limit")
    if limits and not actor.manage_all:
        raise ForbiddenError("only administrators may set limits and budgets")
    clean: dict[str, Any] = {}
    for field, value in limits.items():
        if field in _MONEY_LIMITS:
            clean[field] = check.money(value, field)
        elif field == "budget_period":
            clean[field] = check.budget_period(value)
        else:
            clean[field] = check.count(value, field, minimum=1)
    return clean


def _check_settings(changes: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for field, value in changes.items():
        if field == "name":
            clean[field] = check.name(value)
        elif field == "strategy":
            clean[field] = check.strategy(value)
        elif field == "retry_count":
            clean[field] = check.required_count(value, "retry_count")
        elif field in ("first_byte_timeout", "total_timeout"):
            clean[field] = check.timeout(value, field)
        elif field == "allowed_models":
            clean[field] = check.models(value)
        elif field == "expires_at":
            clean[field] = check.aware(value, "expires_at")
        elif field == "enabled":
            if not isinstance(value, bool):
                raise ValidationError("enabled must be true or false")
            clean[field] = value
        elif field == "provider_key_ids":
            if value is not None and not isinstance(value, list | tuple):
                raise ValidationError("provider_key_ids must be a list")
            clean[field] = value
    return clean


# --- service ------------------------------------------------------------------------------------------------


def create_gateway_key(
    engine: Engine,
    *,
    name: str,
    provider: Ref,
    provider_keys: Sequence[Ref] | None = None,
    owner_id: int | None = None,
    strategy: str = "round_robin",
    retry_count: int = 0,
    allowed_models: Sequence[str] | None = None,
    expires_at: dt.datetime | None = None,
    first_byte_timeout: float | None = None,
    total_timeout: float | None = None,
    enabled: bool = True,
    limits: Mapping[str, Any] | None = None,
    actor: Actor = SYSTEM,
) -> dict[str, Any]:
    """Create a gateway key; the full key is in the result under ``"key"`` and is never retrievable again.

    The pool defaults to every key of the provider the owner may use, in creation order.
    """
    settings = _check_settings(
        {
            "name": name,
            "strategy": strategy,
            "retry_count": retry_count,
            "allowed_models": allowed_models,
            "expires_at": expires_at,
            "first_byte_timeout": first_byte_timeout,
            "total_timeout": total_timeout,
            "enabled": enabled,
        }
    )
    clean_limits = _check_limits(actor, limits or {})
    key = generate_gateway_key()
    with config_session(engine) as session:
        provider_row = get_provider_row(session, provider)
        check_owner(session, actor, owner_id, provider_row)
        pool = _resolve_pool(session, actor, provider_row, owner_id, provider_keys)
        row = GatewayKey(
            owner_id=owner_id,
            provider_id=provider_row.id,
            key_hash=hash_gateway_key(key),
            key_prefix=display_prefix(key),
            **settings,
            **clean_limits,
        )
        session.add(row)
        flush_unique(session, "gateway key")
        _write_pool(session, row.id, pool)
        session.flush()
        result = _view(session, row, provider_row.name)
        audit(session, actor, "create", "gateway_key", row.id, after=result)
    result["key"] = key
    return result


def get_gateway_key(engine: Engine, gateway_key_id: int, *, actor: Actor = SYSTEM) -> dict[str, Any]:
    with Session(engine) as session:
        key = _get(session, gateway_key_id)
        check_visible(actor, key.owner_id, f"gateway key {gateway_key_id}")
        return _view(session, key)


def list_gateway_keys(engine: Engine, *, owner_id: int | None = None) -> list[dict[str, Any]]:
    with Session(engine) as session:
        stmt = sa.select(GatewayKey, Provider.name).join(Provider).order_by(GatewayKey.id)
        if owner_id is not None:
            stmt = stmt.where(GatewayKey.owner_id == owner_id)
        return [_view(session, key, provider_name) for key, provider_name in session.execute(stmt)]


def list_gateway_keys_page(
    engine: Engine,
    *,
    actor: Actor,
    page: int,
    page_size: int,
    provider_id: int | None = None,
    owner_id: int | None = None,
    enabled: bool | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the gateway keys ``actor`` may see, by id, and how many there are."""
    return owned_page(
        engine,
        GatewayKey,
        _view,
        actor=actor,
        page=page,
        page_size=page_size,
        provider_id=provider_id,
        owner_id=owner_id,
        enabled=enabled,
    )


def update_gateway_key(
    engine: Engine, gateway_key_id: int, changes: Mapping[str, Any], *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    """Change settings (name, pool as ``provider_key_ids``, strategy, retries, timeouts, models, expiry,
    enabled) and, for administrators, limits. The provider and the owner are fixed at creation."""
    reject_unknown(changes, _SETTINGS | LIMIT_FIELDS, "gateway key")
    settings = _check_settings({f: v for f, v in changes.items() if f in _SETTINGS})
    clean_limits = _check_limits(actor, {f: v for f, v in changes.items() if f in LIMIT_FIELDS})
    with config_session(engine) as session:
        key = _get(session, gateway_key_id)
        check_changeable(actor, key.owner_id, f"gateway key {gateway_key_id}")
        provider_row = get_provider_row(session, key.provider_id)
        before = _view(session, key, provider_row.name)
        if "provider_key_ids" in settings:
            refs = settings.pop("provider_key_ids")
            _write_pool(session, key.id, _resolve_pool(session, actor, provider_row, key.owner_id, refs))
        for field, value in {**settings, **clean_limits}.items():
            setattr(key, field, value)
        key.updated_at = utcnow()
        session.flush()
        after = _view(session, key, provider_row.name)
        audit(session, actor, "update", "gateway_key", key.id, before=before, after=after)
        return after


def set_gateway_key_enabled(
    engine: Engine, gateway_key_id: int, enabled: bool, *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    return update_gateway_key(engine, gateway_key_id, {"enabled": enabled}, actor=actor)


def set_gateway_key_pool(
    engine: Engine, gateway_key_id: int, provider_keys: Sequence[Ref], *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    """Replace a gateway key's pool (order matters: it is the position order)."""
    return update_gateway_key(engine, gateway_key_id, {"provider_key_ids": list(provider_keys)}, actor=actor)


def regenerate_gateway_key(engine: Engine, gateway_key_id: int, *, actor: Actor = SYSTEM) -> dict[str, Any]:
    """Replace the key's secret: the old key stops working at the next reload, the new one is returned once."""
    key = generate_gateway_key()
    with config_session(engine) as session:
        row = _get(session, gateway_key_id)
        check_changeable(actor, row.owner_id, f"gateway key {gateway_key_id}")
        before = _view(session, row)
        row.key_hash = hash_gateway_key(key)
        row.key_prefix = display_prefix(key)
        row.updated_at = utcnow()
        flush_unique(session, "gateway key")
        result = _view(session, row)
        audit(session, actor, "regenerate", "gateway_key", row.id, before=before, after=result)
    result["key"] = key
    return result


def delete_gateway_key(engine: Engine, gateway_key_id: int, *, actor: Actor = SYSTEM) -> None:
    with config_session(engine) as session:
        key = _get(session, gateway_key_id)
        check_changeable(actor, key.owner_id, f"gateway key {gateway_key_id}")
        before = _view(session, key)
        session.execute(sa.delete(GatewayKey).where(GatewayKey.id == key.id))
        audit(session, actor, "delete", "gateway_key", gateway_key_id, before=before)
