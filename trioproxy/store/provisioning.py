"""Configuration writes: users, providers, provider keys and gateway keys.

The CLI and the admin plane call these (the admin plane through ``trio.to_thread.run_sync``). Each function is
one transaction that bumps the config version (:func:`trioproxy.store.db.config_session`), validates its input
before touching the database, and returns a JSON-ready dict. Returned dicts never hold a secret, a ciphertext
or a key hash; the one exception is the new gateway key, returned once under ``"key"`` by
:func:`create_gateway_key`.

Objects may be named by id (``int``, the admin API) or by name (``str``, the CLI).

Error handling: :class:`~trioproxy.errors.ValidationError` for malformed input,
:class:`~trioproxy.errors.NotFoundError` for a missing object, :class:`~trioproxy.errors.ConflictError` for a
duplicate name or a pool key of another provider (a unique-index race on PostgreSQL becomes a ConflictError
too). Messages never contain secrets.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from trioproxy.crypto import PROVIDER_KEY_AAD, SecretBox, mask_secret
from trioproxy.errors import ConflictError, NotFoundError, ValidationError
from trioproxy.gateway_keys import display_prefix, generate_gateway_key, hash_gateway_key
from trioproxy.snapshot import ProviderKind
from trioproxy.ssrf import parse_base_url
from trioproxy.store.db import config_session
from trioproxy.store.models import GatewayKey, GatewayKeyPool, Provider, ProviderKey, User, utcnow

Ref = int | str  # an object's id, or its name

_MAX_NAME = 100
_MAX_SECRET = 4096
_MAX_MODELS = 1000
# RFC 9110 token: what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STRATEGY = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Headers the proxy owns: framing, routing, and the credentials it injects from provider keys (a credential
# stored here would be shown in plain text by every provider listing).
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "authorization",
        "x-api-key",
        "x-goog-api-key",
        "api-key",
        "cookie",
    }
)


# --- validation ---------------------------------------------------------------------------------------------


def _name(value: str, what: str = "name") -> str:
    value = value.strip()
    if not value or len(value) > _MAX_NAME or any(not char.isprintable() for char in value):
        raise ValidationError(f"the {what} must be 1 to {_MAX_NAME} printable characters")
    return value


def _kind(value: str) -> ProviderKind:
    try:
        return ProviderKind(value.strip().lower())
    except ValueError:
        kinds = ", ".join(kind.value for kind in ProviderKind)
        raise ValidationError(f"the provider kind must be one of {kinds}") from None


def _timeout(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(f"{what} must be a positive number of seconds")
    return float(value)


def _optional_count(value: int | None, what: str, *, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(f"{what} must be an integer >= {minimum}")
    return value


def _headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    clean: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str) or not _TOKEN.fullmatch(name):
            raise ValidationError("header names must be HTTP tokens and values strings")
        if name.lower() in _RESERVED_HEADERS:
            raise ValidationError(f"the header {name} is set by the gateway and cannot be configured")
        # CR, LF or NUL would let a value start a new header (request splitting).
        if any(char in value for char in "\r\n\0") or value != value.strip():
            raise ValidationError(f"the value of header {name} has control characters or outer spaces")
        clean[name] = value
    return clean


def _secret(secret: str) -> str:
    # The secret goes into a header verbatim: printable ASCII without spaces is all any provider issues.
    if not secret or len(secret) > _MAX_SECRET or any(not 0x21 <= ord(char) <= 0x7E for char in secret):
        raise ValidationError("the secret must be non-empty printable ASCII without spaces")
    return secret


def _aware(value: dt.datetime | None, what: str) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValidationError(f"{what} must carry a time zone")
    return value.astimezone(dt.UTC)


def _models(models: Sequence[str] | None) -> list[str] | None:
    if models is None:
        return None
    clean = [_name(model, "model name") for model in models]
    if not clean or len(clean) > _MAX_MODELS:
        raise ValidationError(f"allowed models must list 1 to {_MAX_MODELS} models (or be omitted for any)")
    return list(dict.fromkeys(clean))


# --- JSON views ---------------------------------------------------------------------------------------------
# Allowlists, not denylists: a column added later (a secret, say) stays private until someone lists it here.


def _fields(names: str) -> tuple[str, ...]:
    return tuple(names.split())


_USER_FIELDS = _fields("id username email role enabled created_at updated_at")
_PROVIDER_FIELDS = _fields(
    """id name kind base_url headers connect_timeout first_byte_timeout idle_timeout total_timeout enabled
    created_at updated_at"""
)
_PROVIDER_KEY_FIELDS = _fields(
    """id name provider_id owner_id secret_hint weight enabled state rpm_limit tpm_limit rpd_limit created_at
    updated_at"""
)
_GATEWAY_KEY_FIELDS = _fields(
    """id name key_prefix provider_id owner_id strategy retry_count first_byte_timeout total_timeout rpm_limit
    tpm_limit rpd_limit daily_token_limit daily_cost_limit budget budget_period max_concurrency allowed_models
    expires_at enabled last_used_at created_at updated_at"""
)


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


def _pick(row: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {name: _json_value(getattr(row, name)) for name in fields}


def user_to_json(user: User) -> dict[str, Any]:
    return {**_pick(user, _USER_FIELDS), "has_password": user.password_hash is not None}


def provider_to_json(provider: Provider) -> dict[str, Any]:
    return _pick(provider, _PROVIDER_FIELDS)


def provider_key_to_json(key: ProviderKey, provider_name: str) -> dict[str, Any]:
    return {**_pick(key, _PROVIDER_KEY_FIELDS), "provider": provider_name}


def gateway_key_to_json(key: GatewayKey, provider_name: str, pool: Sequence[str]) -> dict[str, Any]:
    view = _pick(key, _GATEWAY_KEY_FIELDS)
    view["prefix"] = view.pop("key_prefix")
    return {**view, "provider": provider_name, "provider_keys": list(pool)}


# --- lookups ------------------------------------------------------------------------------------------------


def _get_provider(session: Session, ref: Ref) -> Provider:
    if isinstance(ref, int):
        provider = session.get(Provider, ref)
    else:
        provider = session.scalars(sa.select(Provider).where(Provider.name == ref.strip())).one_or_none()
    if provider is None:
        raise NotFoundError(f"provider {ref!r} not found")
    return provider


def _get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"user {user_id} not found")
    return user


def _get_provider_key(session: Session, ref: Ref, *, provider: Provider | None) -> ProviderKey:
    if isinstance(ref, int):
        key = session.get(ProviderKey, ref)
    elif provider is None:
        raise ValidationError("a provider key named by name needs its provider")
    else:
        key = session.scalars(
            sa.select(ProviderKey).where(
                ProviderKey.provider_id == provider.id, ProviderKey.name == ref.strip()
            )
        ).one_or_none()
    if key is None:
        raise NotFoundError(f"provider key {ref!r} not found")
    return key


def _get_gateway_key(session: Session, gateway_key_id: int) -> GatewayKey:
    key = session.get(GatewayKey, gateway_key_id)
    if key is None:
        raise NotFoundError(f"gateway key {gateway_key_id} not found")
    return key


def _pool_names(session: Session, gateway_key_id: int) -> list[str]:
    stmt = (
        sa.select(ProviderKey.name)
        .join(GatewayKeyPool, GatewayKeyPool.provider_key_id == ProviderKey.id)
        .where(GatewayKeyPool.gateway_key_id == gateway_key_id)
        .order_by(GatewayKeyPool.position)
    )
    return list(session.scalars(stmt))


def _flush_unique(session: Session, what: str) -> None:
    """Flush, turning a unique-index violation (a concurrent duplicate on PostgreSQL) into a ConflictError."""
    try:
        session.flush()
    except sa.exc.IntegrityError:
        raise ConflictError(f"{what} already exists") from None


# --- users --------------------------------------------------------------------------------------------------


def create_user(
    engine: Engine,
    *,
    username: str,
    email: str | None = None,
    role: str = "user",
    password_hash: str | None = None,
    enabled: bool = True,
) -> dict[str, Any]:
    """Create a user (the admin plane hashes passwords; this stores the hash it is given)."""
    username = _name(username, "username")
    role = _name(role, "role")
    with config_session(engine) as session:
        if session.scalars(sa.select(User.id).where(User.username == username)).first() is not None:
            raise ConflictError(f"user {username!r} already exists")
        user = User(username=username, email=email, role=role, password_hash=password_hash, enabled=enabled)
        session.add(user)
        _flush_unique(session, f"user {username!r}")
        return user_to_json(user)


def set_user_enabled(engine: Engine, user_id: int, enabled: bool) -> dict[str, Any]:
    """Enable or disable a user; a disabled user's gateway keys stop working at the next snapshot."""
    with config_session(engine) as session:
        user = _get_user(session, user_id)
        user.enabled = enabled
        if not enabled:
            user.token_version += 1  # revokes the user's admin sessions too
        session.flush()
        return user_to_json(user)


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
) -> dict[str, Any]:
    """Add a provider; its base URL passes the SSRF guard (private addresses only with ``allow_private``)."""
    name = _name(name)
    provider_kind = _kind(kind)
    base_url = base_url.strip()
    parse_base_url(base_url, allow_private=allow_private)
    provider = Provider(
        name=name,
        kind=provider_kind.value,
        base_url=base_url.rstrip("/"),
        headers=_headers(headers),
        connect_timeout=_timeout(connect_timeout, "connect_timeout"),
        first_byte_timeout=_timeout(first_byte_timeout, "first_byte_timeout"),
        idle_timeout=_timeout(idle_timeout, "idle_timeout"),
        total_timeout=_timeout(total_timeout, "total_timeout"),
        enabled=enabled,
    )
    with config_session(engine) as session:
        if session.scalars(sa.select(Provider.id).where(Provider.name == name)).first() is not None:
            raise ConflictError(f"provider {name!r} already exists")
        session.add(provider)
        _flush_unique(session, f"provider {name!r}")
        return provider_to_json(provider)


def list_providers(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [provider_to_json(p) for p in session.scalars(sa.select(Provider).order_by(Provider.id))]


def set_provider_enabled(engine: Engine, provider: Ref, enabled: bool) -> dict[str, Any]:
    with config_session(engine) as session:
        row = _get_provider(session, provider)
        row.enabled = enabled
        session.flush()
        return provider_to_json(row)


def delete_provider(engine: Engine, provider: Ref) -> None:
    """Delete a provider and its keys; refused while gateway keys still route to it."""
    with config_session(engine) as session:
        row = _get_provider(session, provider)
        in_use = session.scalars(sa.select(GatewayKey.id).where(GatewayKey.provider_id == row.id)).first()
        if in_use is not None:
            raise ConflictError(f"provider {row.name!r} still has gateway keys; delete them first")
        session.execute(sa.delete(Provider).where(Provider.id == row.id))


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
) -> dict[str, Any]:
    """Store a provider API key, encrypted; the result shows only its masked hint."""
    name = _name(name)
    secret = _secret(secret)
    checked_weight = _optional_count(weight, "weight")
    if checked_weight is None:
        raise ValidationError("weight must be an integer >= 0")
    limits = {
        "rpm_limit": _optional_count(rpm_limit, "rpm_limit", minimum=1),
        "tpm_limit": _optional_count(tpm_limit, "tpm_limit", minimum=1),
        "rpd_limit": _optional_count(rpd_limit, "rpd_limit", minimum=1),
    }
    with config_session(engine) as session:
        row = _get_provider(session, provider)
        if owner_id is not None:
            _get_user(session, owner_id)
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
        _flush_unique(session, f"provider key {name!r}")
        return provider_key_to_json(key, row.name)


def list_provider_keys(engine: Engine, provider: Ref | None = None) -> list[dict[str, Any]]:
    with Session(engine) as session:
        stmt = sa.select(ProviderKey, Provider.name).join(Provider).order_by(ProviderKey.id)
        if provider is not None:
            stmt = stmt.where(ProviderKey.provider_id == _get_provider(session, provider).id)
        return [provider_key_to_json(key, provider_name) for key, provider_name in session.execute(stmt)]


def set_provider_key_enabled(
    engine: Engine, provider_key: Ref, enabled: bool, *, provider: Ref | None = None
) -> dict[str, Any]:
    with config_session(engine) as session:
        owner = _get_provider(session, provider) if provider is not None else None
        key = _get_provider_key(session, provider_key, provider=owner)
        key.enabled = enabled
        session.flush()
        return provider_key_to_json(key, _get_provider(session, key.provider_id).name)


def delete_provider_key(engine: Engine, provider_key: Ref, *, provider: Ref | None = None) -> None:
    """Delete a provider key; it leaves every gateway key pool it was in."""
    with config_session(engine) as session:
        owner = _get_provider(session, provider) if provider is not None else None
        key = _get_provider_key(session, provider_key, provider=owner)
        session.execute(sa.delete(ProviderKey).where(ProviderKey.id == key.id))


# --- gateway keys -------------------------------------------------------------------------------------------


def _resolve_pool(session: Session, provider: Provider, refs: Sequence[Ref] | None) -> list[ProviderKey]:
    """The pool's keys in order; every one must belong to ``provider`` (ConflictError otherwise)."""
    if refs is None:
        stmt = sa.select(ProviderKey).where(ProviderKey.provider_id == provider.id).order_by(ProviderKey.id)
        return list(session.scalars(stmt))
    keys: list[ProviderKey] = []
    for ref in refs:
        if isinstance(ref, int):
            key = _get_provider_key(session, ref, provider=None)
        else:
            found = session.scalars(
                sa.select(ProviderKey).where(ProviderKey.name == ref.strip()).order_by(ProviderKey.id)
            ).all()
            if not found:
                raise NotFoundError(f"provider key {ref!r} not found")
            own = [candidate for candidate in found if candidate.provider_id == provider.id]
            key = own[0] if own else found[0]
        if key.provider_id != provider.id:
            raise ConflictError(f"provider key {ref!r} belongs to another provider than {provider.name!r}")
        if all(existing.id != key.id for existing in keys):
            keys.append(key)
    return keys


def _write_pool(session: Session, gateway_key_id: int, keys: Sequence[ProviderKey]) -> None:
    session.execute(sa.delete(GatewayKeyPool).where(GatewayKeyPool.gateway_key_id == gateway_key_id))
    session.add_all(
        GatewayKeyPool(gateway_key_id=gateway_key_id, provider_key_id=key.id, position=position)
        for position, key in enumerate(keys)
    )


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
) -> dict[str, Any]:
    """Create a gateway key; the full key is in the result under ``"key"`` and is never retrievable again.

    The pool defaults to every key the provider has now, in creation order.
    """
    name = _name(name)
    strategy = strategy.strip()
    if not _STRATEGY.fullmatch(strategy):
        raise ValidationError("the strategy must be a lower-case identifier such as round_robin")
    checked_retries = _optional_count(retry_count, "retry_count")
    if checked_retries is None:
        raise ValidationError("retry_count must be an integer >= 0")
    models = _models(allowed_models)
    expires = _aware(expires_at, "expires_at")
    key = generate_gateway_key()
    with config_session(engine) as session:
        provider_row = _get_provider(session, provider)
        if owner_id is not None:
            _get_user(session, owner_id)
        pool = _resolve_pool(session, provider_row, provider_keys)
        row = GatewayKey(
            owner_id=owner_id,
            name=name,
            provider_id=provider_row.id,
            key_hash=hash_gateway_key(key),
            key_prefix=display_prefix(key),
            strategy=strategy,
            retry_count=checked_retries,
            allowed_models=models,
            expires_at=expires,
            first_byte_timeout=_timeout(first_byte_timeout, "first_byte_timeout"),
            total_timeout=_timeout(total_timeout, "total_timeout"),
            enabled=enabled,
        )
        session.add(row)
        _flush_unique(session, "gateway key")
        _write_pool(session, row.id, pool)
        result = gateway_key_to_json(row, provider_row.name, [k.name for k in pool])
    result["key"] = key
    return result


def list_gateway_keys(engine: Engine, *, owner_id: int | None = None) -> list[dict[str, Any]]:
    with Session(engine) as session:
        stmt = sa.select(GatewayKey, Provider.name).join(Provider).order_by(GatewayKey.id)
        if owner_id is not None:
            stmt = stmt.where(GatewayKey.owner_id == owner_id)
        return [
            gateway_key_to_json(key, provider_name, _pool_names(session, key.id))
            for key, provider_name in session.execute(stmt)
        ]


def set_gateway_key_enabled(engine: Engine, gateway_key_id: int, enabled: bool) -> dict[str, Any]:
    with config_session(engine) as session:
        key = _get_gateway_key(session, gateway_key_id)
        key.enabled = enabled
        session.flush()
        provider_name = _get_provider(session, key.provider_id).name
        return gateway_key_to_json(key, provider_name, _pool_names(session, key.id))


def set_gateway_key_pool(engine: Engine, gateway_key_id: int, provider_keys: Sequence[Ref]) -> dict[str, Any]:
    """Replace a gateway key's pool (order matters: it is the position order)."""
    with config_session(engine) as session:
        key = _get_gateway_key(session, gateway_key_id)
        provider_row = _get_provider(session, key.provider_id)
        pool = _resolve_pool(session, provider_row, provider_keys)
        _write_pool(session, key.id, pool)
        key.updated_at = utcnow()
        session.flush()
        return gateway_key_to_json(key, provider_row.name, [k.name for k in pool])


def delete_gateway_key(engine: Engine, gateway_key_id: int) -> None:
    with config_session(engine) as session:
        key = _get_gateway_key(session, gateway_key_id)
        session.execute(sa.delete(GatewayKey).where(GatewayKey.id == key.id))
