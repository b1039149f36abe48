"""Configuration writes and scoped reads: providers and provider keys (gateway keys: :mod:`.gateway_key_store`).

This is the one service layer the CLI and the admin API share. Each write is one transaction that bumps the
config version (:func:`trioproxy.store.db.config_session`), appends exactly one audit row
(:func:`trioproxy.store.actor.audit`), validates its input before touching the database, and returns a JSON-ready
dict. Returned dicts never hold a secret, a ciphertext or a key hash.

Every function takes the :class:`~trioproxy.store.actor.Actor` it acts for (the CLI's default is ``SYSTEM``).
Providers are global: only the admin API's permission check stands in front of them. Provider keys have an
owner: a ``None`` owner means a shared key (created by the CLI, or by an administrator who said so) that any
user's gateway keys may pool; an owned key is seen and changed only by its owner and administrators.

Objects may be named by id (``int``, the admin API) or by name (``str``, the CLI).

Error handling: :class:`~trioproxy.errors.ValidationError` for malformed input,
:class:`~trioproxy.errors.NotFoundError` for a missing (or invisible) object,
:class:`~trioproxy.errors.ForbiddenError` for a visible object the actor may not change,
:class:`~trioproxy.errors.ConflictError` for a duplicate name or a pool key of another provider (a unique-index
race on PostgreSQL becomes a ConflictError too). Messages never contain secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from trioproxy.crypto import PROVIDER_KEY_AAD, SecretBox, mask_secret
from trioproxy.errors import ConflictError, ValidationError
from trioproxy.snapshot import ProviderKind
from trioproxy.ssrf import parse_base_url
from trioproxy.store import validation as check
from trioproxy.store.actor import SYSTEM, Actor, audit, check_changeable, check_visible, owned_page
from trioproxy.store.db import config_session, read_transaction, write_session
from trioproxy.store.gateway_key_store import (
    create_gateway_key,
    delete_gateway_key,
    get_gateway_key,
    list_gateway_keys,
    list_gateway_keys_page,
    regenerate_gateway_key,
    set_gateway_key_enabled,
    set_gateway_key_pool,
    update_gateway_key,
)
from trioproxy.store.lookups import (
    Ref,
    check_owner,
    flush_unique,
    get_provider_key_row,
    get_provider_row,
    reject_unknown,
)
from trioproxy.store.models import GatewayKey, Provider, ProviderKey
from trioproxy.store.request_query import page_offset
from trioproxy.store.users import create_user, set_user_enabled
from trioproxy.store.validation import provider_key_to_json, provider_to_json

__all__ = [
    "ProbeTarget",
    "Ref",
    "add_provider",
    "add_provider_key",
    "create_gateway_key",
    "create_user",
    "delete_gateway_key",
    "delete_provider",
    "delete_provider_key",
    "get_gateway_key",
    "get_provider",
    "get_provider_key",
    "list_gateway_keys",
    "list_gateway_keys_page",
    "list_provider_keys",
    "list_provider_keys_page",
    "list_providers",
    "list_providers_page",
    "probe_target",
    "record_probe",
    "regenerate_gateway_key",
    "set_gateway_key_enabled",
    "set_gateway_key_pool",
    "set_provider_enabled",
    "set_provider_key_enabled",
    "set_user_enabled",
    "update_gateway_key",
    "update_provider",
    "update_provider_key",
]


_TIMEOUTS = ("connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout")
_PROVIDER_UPDATABLE = frozenset({"name", "base_url", "headers", "enabled", *_TIMEOUTS})
_KEY_LIMITS = ("rpm_limit", "tpm_limit", "rpd_limit")
_PROVIDER_KEY_UPDATABLE = frozenset({"name", "secret", "weight", "enabled", *_KEY_LIMITS})


# --- providers ----------------------------------------------------------------------------------------------


def add_provider(
    engine: Engine,
    *,
    name: str,
    kind: str,
    base_url: str,
    headers: Mapping[str, str] | None = None,
    connect_timeout: float | None = None,
    first_byte_timeout: float | None = None,
    idle_timeout: float | None = None,
    total_timeout: float | None = None,
    enabled: bool = True,
    allow_private: bool,
    actor: Actor = SYSTEM,
) -> dict[str, Any]:
    """Add a provider; its base URL passes the SSRF guard (private addresses only with ``allow_private``)."""
    name = check.name(name)
    provider_kind = check.kind(kind)
    base_url = base_url.strip()
    parse_base_url(base_url, allow_private=allow_private)
    provider = Provider(
        name=name,
        kind=provider_kind.value,
        base_url=base_url.rstrip("/"),
        headers=check.headers(headers),
        connect_timeout=check.timeout(connect_timeout, "connect_timeout"),
        first_byte_timeout=check.timeout(first_byte_timeout, "first_byte_timeout"),
        idle_timeout=check.timeout(idle_timeout, "idle_timeout"),
        total_timeout=check.timeout(total_timeout, "total_timeout"),
        enabled=enabled,
    )
    with config_session(engine) as session:
        if session.scalars(sa.select(Provider.id).where(Provider.name == name)).first() is not None:
            raise ConflictError(f"provider {name!r} already exists")
        session.add(provider)
        flush_unique(session, f"provider {name!r}")
        view = provider_to_json(provider)
        audit(session, actor, "create", "provider", provider.id, after=view)
        return view


def get_provider(engine: Engine, provider: Ref) -> dict[str, Any]:
    with Session(engine) as session:
        return provider_to_json(get_provider_row(session, provider))


def list_providers(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [provider_to_json(p) for p in session.scalars(sa.select(Provider).order_by(Provider.id))]


def list_providers_page(
    engine: Engine, *, page: int, page_size: int, kind: str | None = None, enabled: bool | None = None
) -> tuple[list[dict[str, Any]], int]:
    offset = page_offset(page, page_size)
    conditions: list[sa.ColumnElement[bool]] = []
    if kind is not None:
        conditions.append(Provider.kind == check.kind(kind).value)
    if enabled is not None:
        conditions.append(Provider.enabled == enabled)
    with read_transaction(engine) as conn, Session(bind=conn) as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(Provider).where(*conditions)) or 0
        rows = session.scalars(
            sa.select(Provider).where(*conditions).order_by(Provider.id).limit(page_size).offset(offset)
        )
        return [provider_to_json(p) for p in rows], int(total)


def update_provider(
    engine: Engine,
    provider: Ref,
    changes: Mapping[str, Any],
    *,
    allow_private: bool,
    actor: Actor = SYSTEM,
) -> dict[str, Any]:
    """Change any of name, base_url, headers, enabled and the four timeouts (``None`` restores the default).

    The kind is fixed at creation: the provider's keys and prices belong to it.
    """
    reject_unknown(changes, _PROVIDER_UPDATABLE, "provider")
    clean: dict[str, Any] = {}
    if "name" in changes:
        clean["name"] = check.name(changes["name"])
    if "base_url" in changes:
        base_url = str(changes["base_url"]).strip()
        parse_base_url(base_url, allow_private=allow_private)
        clean["base_url"] = base_url.rstrip("/")
    if "headers" in changes:
        if not isinstance(changes["headers"], Mapping):
            raise ValidationError("headers must be an object (send {} to remove them all)")
        clean["headers"] = check.headers(changes["headers"])
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationError("enabled must be true or false")
        clean["enabled"] = changes["enabled"]
    for field in _TIMEOUTS:
        if field in changes:
            clean[field] = check.timeout(changes[field], field)
    with config_session(engine) as session:
        row = get_provider_row(session, provider)
        before = provider_to_json(row)
        if "name" in clean and clean["name"] != row.name:
            taken = session.scalars(
                sa.select(Provider.id).where(Provider.name == clean["name"], Provider.id != row.id)
            ).first()
            if taken is not None:
                raise ConflictError(f"provider {clean['name']!r} already exists")
        for field, value in clean.items():
            setattr(row, field, value)
        flush_unique(session, "a provider with that name")
        after = provider_to_json(row)
        audit(session, actor, "update", "provider", row.id, before=before, after=after)
        return after


def set_provider_enabled(
    engine: Engine, provider: Ref, enabled: bool, *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    # allow_private is irrelevant: the base URL does not change.
    return update_provider(engine, provider, {"enabled": enabled}, allow_private=True, actor=actor)


def delete_provider(engine: Engine, provider: Ref, *, actor: Actor = SYSTEM) -> None:
    """Delete a provider and its keys; refused while gateway keys still route to it."""
    with config_session(engine) as session:
        row = get_provider_row(session, provider)
        in_use = session.scalars(sa.select(GatewayKey.id).where(GatewayKey.provider_id == row.id)).first()
        if in_use is not None:
            raise ConflictError(f"provider {row.name!r} still has gateway keys; delete them first")
        before = provider_to_json(row)
        session.execute(sa.delete(Provider).where(Provider.id == row.id))
        audit(session, actor, "delete", "provider", row.id, before=before)


# --- provider keys ------------------------------------------------------------------------------------------


def add_provider_key(
    engine: Engine,
    box: SecretBox,
    *,
    provider: Ref,
    name: str,
    secret: str,
    weight: int = 1,
    owner_id: int | None = None,
    enabled: bool = True,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    rpd_limit: int | None = None,
    actor: Actor = SYSTEM,
) -> dict[str, Any]:
    """Store a provider API key, encrypted; the result shows only its masked hint.

    ``owner_id=None`` makes a shared key; only an actor managing every tenant may create one, or a key for
    someone else.
    """
    name = check.name(name)
    secret = check.secret(secret)
    checked_weight = check.required_count(weight, "weight")
    limits = {
        field: check.count(value, field, minimum=1)
        for field, value in zip(_KEY_LIMITS, (rpm_limit, tpm_limit, rpd_limit), strict=True)
    }
    with config_session(engine) as session:
        row = get_provider_row(session, provider)
        check_owner(session, actor, owner_id, row)
        exists = session.scalars(
            sa.select(ProviderKey.id).where(ProviderKey.provider_id == row.id, ProviderKey.name == name)
        ).first()
        if exists is not None:
            raise ConflictError(f"provider {row.name!r} already has a key named {name!r}")
        key = ProviderKey(
            provider_id=row.id,
            owner_id=owner_id,
            name=name,
            secret_ciphertext=box.encrypt(secret, associated_data=PROVIDER_KEY_AAD),
            secret_hint=mask_secret(secret),
            weight=checked_weight,
            enabled=enabled,
            **limits,
        )
        session.add(key)
        flush_unique(session, f"provider key {name!r}")
        view = provider_key_to_json(key, row.name)
        audit(session, actor, "create", "provider_key", key.id, after=view)
        return view


def get_provider_key(engine: Engine, key_id: int, *, actor: Actor = SYSTEM) -> dict[str, Any]:
    with Session(engine) as session:
        key = get_provider_key_row(session, key_id, provider=None)
        check_visible(actor, key.owner_id, f"provider key {key_id}")
        return provider_key_to_json(key, get_provider_row(session, key.provider_id).name)


def list_provider_keys(engine: Engine, provider: Ref | None = None) -> list[dict[str, Any]]:
    with Session(engine) as session:
        stmt = sa.select(ProviderKey, Provider.name).join(Provider).order_by(ProviderKey.id)
        if provider is not None:
            stmt = stmt.where(ProviderKey.provider_id == get_provider_row(session, provider).id)
        return [provider_key_to_json(key, provider_name) for key, provider_name in session.execute(stmt)]


def list_provider_keys_page(
    engine: Engine,
    *,
    actor: Actor,
    page: int,
    page_size: int,
    provider_id: int | None = None,
    owner_id: int | None = None,
    enabled: bool | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the provider keys ``actor`` may see, by id, and how many there are."""
    return owned_page(
        engine,
        ProviderKey,
        lambda _session, key, provider_name: provider_key_to_json(key, provider_name),
        actor=actor,
        page=page,
        page_size=page_size,
        provider_id=provider_id,
        owner_id=owner_id,
        enabled=enabled,
    )


def update_provider_key(
    engine: Engine, box: SecretBox | None, key_id: int, changes: Mapping[str, Any], *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    """Change any of name, secret (write-only: re-encrypted, the hint follows), weight, enabled and limits.

    A field left out keeps its value; the secret is never required (a masked hint sent back would be
    refused by the secret check before it could overwrite the key).
    """
    reject_unknown(changes, _PROVIDER_KEY_UPDATABLE, "provider key")
    clean: dict[str, Any] = {}
    if "name" in changes:
        clean["name"] = check.name(changes["name"])
    if "secret" in changes:
        if box is None:
            raise ValidationError("this update cannot change the secret")
        secret = check.secret(changes["secret"])
        clean["secret_ciphertext"] = box.encrypt(secret, associated_data=PROVIDER_KEY_AAD)
        clean["secret_hint"] = mask_secret(secret)
    if "weight" in changes:
        clean["weight"] = check.required_count(changes["weight"], "weight")
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationError("enabled must be true or false")
        clean["enabled"] = changes["enabled"]
    for field in _KEY_LIMITS:
        if field in changes:
            clean[field] = check.count(changes[field], field, minimum=1)
    with config_session(engine) as session:
        key = get_provider_key_row(session, key_id, provider=None)
        check_changeable(actor, key.owner_id, f"provider key {key_id}")
        provider_name = get_provider_row(session, key.provider_id).name
        before = provider_key_to_json(key, provider_name)
        if "name" in clean and clean["name"] != key.name:
            taken = session.scalars(
                sa.select(ProviderKey.id).where(
                    ProviderKey.provider_id == key.provider_id,
                    ProviderKey.name == clean["name"],
                    ProviderKey.id != key.id,
                )
            ).first()
            if taken is not None:
                raise ConflictError(f"provider {provider_name!r} already has a key named {clean['name']!r}")
        for field, value in clean.items():
            setattr(key, field, value)
        flush_unique(session, "a provider key with that name")
        after = provider_key_to_json(key, provider_name)
        if "secret" in changes:
            after["secret_changed"] = True
        audit(session, actor, "update", "provider_key", key.id, before=before, after=after)
        return provider_key_to_json(key, provider_name)


def set_provider_key_enabled(
    engine: Engine, provider_key: Ref, enabled: bool, *, provider: Ref | None = None, actor: Actor = SYSTEM
) -> dict[str, Any]:
    key_id = _provider_key_id(engine, provider_key, provider)
    return update_provider_key(engine, None, key_id, {"enabled": enabled}, actor=actor)


def delete_provider_key(
    engine: Engine, provider_key: Ref, *, provider: Ref | None = None, actor: Actor = SYSTEM
) -> None:
    """Delete a provider key; it leaves every gateway key pool it was in."""
    with config_session(engine) as session:
        owner = get_provider_row(session, provider) if provider is not None else None
        key = get_provider_key_row(session, provider_key, provider=owner)
        check_changeable(actor, key.owner_id, f"provider key {provider_key!r}")
        before = provider_key_to_json(key, get_provider_row(session, key.provider_id).name)
        session.execute(sa.delete(ProviderKey).where(ProviderKey.id == key.id))
        audit(session, actor, "delete", "provider_key", key.id, before=before)


def _provider_key_id(engine: Engine, provider_key: Ref, provider: Ref | None) -> int:
    if isinstance(provider_key, int):
        return provider_key
    with Session(engine) as session:
        owner = get_provider_row(session, provider) if provider is not None else None
        return get_provider_key_row(session, provider_key, provider=owner).id


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """What a key test needs: the provider's address and headers and the decrypted secret (server side only)."""

    kind: ProviderKind
    base_url: str
    headers: tuple[tuple[str, str], ...]
    connect_timeout: float | None
    secret: str

    def __repr__(self) -> str:
        return f"ProbeTarget(kind={self.kind.value}, base_url={self.base_url!r})"


def probe_target(engine: Engine, box: SecretBox, key_id: int, *, actor: Actor) -> ProbeTarget:
    """The decrypted target of ``POST /api/provider-keys/{id}/test``, for an actor who may change the key."""
    with Session(engine) as session:
        key = get_provider_key_row(session, key_id, provider=None)
        check_changeable(actor, key.owner_id, f"provider key {key_id}")
        provider = get_provider_row(session, key.provider_id)
        return ProbeTarget(
            kind=ProviderKind(provider.kind),
            base_url=provider.base_url,
            headers=tuple((provider.headers or {}).items()),
            connect_timeout=provider.connect_timeout,
            secret=box.decrypt(key.secret_ciphertext, associated_data=PROVIDER_KEY_AAD),
        )


def record_probe(engine: Engine, key_id: int, result: Mapping[str, Any], *, actor: Actor) -> None:
    """The audit row of a key test (no configuration changes, so the config version stays)."""
    with write_session(engine) as session:
        audit(session, actor, "test", "provider_key", key_id, after=dict(result))
