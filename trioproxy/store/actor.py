"""Who is changing the configuration: tenancy checks and the audit row every write leaves.

Every service call takes an :class:`Actor`. The CLI (an operator with shell access to the database) is
:data:`SYSTEM`: every permission, every tenant. An admin-API caller is built from its user row and role.

Tenancy: without ``view_all_tenants`` an actor reads only objects it owns; without ``manage_all_tenants`` it
changes only objects it owns. An object the actor may not read answers exactly like a missing one
(:class:`~trioproxy.errors.NotFoundError`), so ids of other tenants cannot be probed; an object it may read but
not change answers :class:`~trioproxy.errors.ForbiddenError`.

Audit: :func:`audit` appends the one row of a write inside the write's own transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from trioproxy.errors import ForbiddenError, NotFoundError
from trioproxy.roles import Permission
from trioproxy.store.audit import record_audit
from trioproxy.store.db import read_transaction
from trioproxy.store.models import Provider
from trioproxy.store.request_query import page_offset


@dataclass(frozen=True, slots=True)
class Actor:
    user_id: int | None  # None: the system itself (CLI, bootstrap)
    name: str | None
    permissions: frozenset[Permission]
    ip: str | None = None

    @property
    def view_all(self) -> bool:
        return self.user_id is None or Permission.VIEW_ALL_TENANTS in self.permissions

    @property
    def manage_all(self) -> bool:
        return self.user_id is None or Permission.MANAGE_ALL_TENANTS in self.permissions

    def has(self, permission: Permission) -> bool:
        return permission in self.permissions

    def owner_filter(self) -> int | None:
        """The owner id reads must be limited to, or None for every owner."""
        return None if self.view_all else self.user_id

    def can_see(self, owner_id: int | None) -> bool:
        return self.view_all or (owner_id is not None and owner_id == self.user_id)

    def can_change(self, owner_id: int | None) -> bool:
        return self.manage_all or (owner_id is not None and owner_id == self.user_id)


SYSTEM = Actor(user_id=None, name="system", permissions=frozenset(Permission))


def check_visible(actor: Actor, owner_id: int | None, what: str) -> None:
    """NotFoundError when ``actor`` may not read an object owned by ``owner_id``."""
    if not actor.can_see(owner_id):
        raise NotFoundError(f"{what} not found")


def check_changeable(actor: Actor, owner_id: int | None, what: str) -> None:
    """NotFoundError when the object is invisible to ``actor``, ForbiddenError when it is read-only to it."""
    check_visible(actor, owner_id, what)
    if not actor.can_change(owner_id):
        raise ForbiddenError(f"{what} belongs to another user")


def resolve_owner(actor: Actor, requested: int | None, *, given: bool) -> int | None:
    """The owner of a new object: the actor itself, unless an actor who manages every tenant named one.

    ``given`` says whether the caller named an owner at all (``None`` then means "shared / the system's").
    """
    if not given:
        return actor.user_id
    if requested != actor.user_id and not actor.manage_all:
        raise ForbiddenError("only administrators may create objects for another owner")
    return requested


_Stmt = TypeVar("_Stmt", bound="sa.Select[*tuple[Any, ...]]")


def scoped(stmt: _Stmt, actor: Actor, owner_column: Any) -> _Stmt:
    """``stmt`` limited to the objects ``actor`` may read."""
    owner = actor.owner_filter()
    return stmt if owner is None else stmt.where(owner_column == owner)


def owned_page(
    engine: Engine,
    model: Any,
    render: Callable[[Session, Any, str], dict[str, Any]],
    *,
    actor: Actor,
    page: int,
    page_size: int,
    provider_id: int | None = None,
    owner_id: int | None = None,
    enabled: bool | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page (by id) of a per-provider, owned, switchable object (provider keys, gateway keys) that ``actor``
    may see, each rendered by ``render(session, row, provider_name)``, and how many there are."""
    conditions: list[sa.ColumnElement[bool]] = []
    if provider_id is not None:
        conditions.append(model.provider_id == provider_id)
    if owner_id is not None:
        conditions.append(model.owner_id == owner_id)
    if enabled is not None:
        conditions.append(model.enabled == enabled)
    rows_stmt = scoped(sa.select(model, Provider.name).join(Provider), actor, model.owner_id)
    count_stmt = scoped(sa.select(sa.func.count()).select_from(model), actor, model.owner_id)
    with read_transaction(engine) as conn, Session(bind=conn) as session:
        total = session.scalar(count_stmt.where(*conditions)) or 0
        rows = session.execute(
            rows_stmt.where(*conditions)
            .order_by(model.id)
            .limit(page_size)
            .offset(page_offset(page, page_size))
        ).all()
        return [render(session, row, provider_name) for row, provider_name in rows], int(total)


def audit(
    session: Session,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: int | str | None,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Append the audit row of this write, in the write's transaction (it commits or rolls back with it)."""
    record_audit(
        session,
        actor_id=actor.user_id,
        actor_name=actor.name,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        before=before,
        after=after,
        ip=actor.ip,
    )
