"""Row lookups and write-time checks shared by the provisioning modules (inside the caller's session)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from trioproxy.errors import ConflictError, ForbiddenError, NotFoundError, ValidationError
from trioproxy.roles import may_use_kind
from trioproxy.store.actor import Actor
from trioproxy.store.models import Provider, ProviderKey, User

Ref = int | str  # an object's id, or its name


def get_provider_row(session: Session, ref: Ref) -> Provider:
    if isinstance(ref, int):
        provider = session.get(Provider, ref)
    else:
        provider = session.scalars(sa.select(Provider).where(Provider.name == ref.strip())).one_or_none()
    if provider is None:
        raise NotFoundError(f"provider {ref!r} not found")
    return provider


def get_provider_key_row(session: Session, ref: Ref, *, provider: Provider | None) -> ProviderKey:
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


def check_owner(session: Session, actor: Actor, owner_id: int | None, provider: Provider) -> None:
    """``actor`` may create objects for ``owner_id`` (``None``: shared), who exists and may use the provider's
    kind."""
    if not actor.can_change(owner_id):
        raise ForbiddenError("only administrators may create objects for another owner or shared ones")
    if owner_id is None:
        return
    owner = session.get(User, owner_id)
    if owner is None:
        raise NotFoundError(f"user {owner_id} not found")
    if not may_use_kind(owner.role, provider.kind):
        raise ForbiddenError(f"the owner's role ({owner.role}) may not use {provider.kind} providers")


def flush_unique(session: Session, what: str) -> None:
    """Flush, turning a unique-index violation (a concurrent duplicate on PostgreSQL) into a ConflictError."""
    try:
        session.flush()
    except sa.exc.IntegrityError:
        raise ConflictError(f"{what} already exists") from None


def reject_unknown(changes: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = set(changes) - allowed
    if unknown:
        raise ValidationError(f"unknown {what} fields: {', '.join(sorted(unknown))}")
