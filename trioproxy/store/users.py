"""User accounts: passwords, roles, revocation, and the first administrator.

Passwords are hashed with argon2id at OWASP's parameters (m = 19 MiB, t = 2, p = 1); a hash made with older
parameters is upgraded at the next successful login. Hashing happens before a write transaction opens, so the
database lock is never held for the 20-80 ms a hash takes.

Revocation: every admin token carries the user's ``token_version``; a password change, a role change, disabling
the account and "log out everywhere" bump it, so every token issued before stops working at its next use.
Disabling a user also bumps the config version (every write here does), and the snapshot loader folds the
disabled owner into each of their gateway keys: the data plane refuses them within one reload.

Rules that protect the accounts themselves: a role may only be given (and an account holding it only be changed)
by someone holding every permission of that role (:func:`~trioproxy.roles.can_grant`); nobody disables, deletes
or re-roles their own account, so the last administrator cannot lock everyone out by accident.

Everything is blocking; async callers use ``trio.to_thread.run_sync`` (password hashing under a limiter of its
own: each hash holds 19 MiB).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import argon2
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from trioproxy.errors import ConfigError, ConflictError, ForbiddenError, NotFoundError, ValidationError
from trioproxy.roles import ROLES, can_grant, is_role
from trioproxy.store import validation as check
from trioproxy.store.actor import SYSTEM, Actor, audit
from trioproxy.store.db import config_session, read_transaction, write_session
from trioproxy.store.models import User
from trioproxy.store.request_query import page_offset
from trioproxy.store.validation import user_to_json

BOOTSTRAP_USERNAME = "admin"
MIN_PASSWORD = 12  # NIST SP 800-63B asks for at least 8; a gateway holding provider keys deserves more
MAX_PASSWORD = 1024  # argon2 has no length limit (unlike bcrypt's 72 bytes); this only bounds the work
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")
_UPDATABLE = frozenset({"username", "email", "role", "enabled", "password", "budget", "budget_period"})

# OWASP Password Storage Cheat Sheet: argon2id, 19 MiB, 2 iterations, 1 lane.
_HASHER = argon2.PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=argon2.Type.ID
)


# --- passwords ----------------------------------------------------------------------------------------------


def check_password_policy(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValidationError(f"a password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(check_password_policy(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; an account without a hash (or an unknown user, ``None``) costs one
    verification of a dummy hash, so the answer takes as long either way."""
    if password_hash is None:
        _verify(_dummy_hash(), password)
        return False
    return _verify(password_hash, password)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False


def needs_rehash(password_hash: str) -> bool:
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except argon2.exceptions.InvalidHashError:
        return True


@functools.cache
def _dummy_hash() -> str:
    # Computed on first use, not at import; same parameters as real hashes, so it costs the same to verify.
    return _HASHER.hash(secrets.token_urlsafe(16))


# --- reads --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthUser:
    """What authentication needs to know about an account (never leaves the server)."""

    id: int
    username: str
    role: str
    enabled: bool
    token_version: int
    password_hash: str | None


def _auth_user(user: User) -> AuthUser:
    return AuthUser(user.id, user.username, user.role, user.enabled, user.token_version, user.password_hash)


def find_for_login(engine: Engine, username: str) -> AuthUser | None:
    with Session(engine) as session:
        user = session.scalars(sa.select(User).where(User.username == username.strip())).one_or_none()
        return None if user is None else _auth_user(user)


def get_auth_user(engine: Engine, user_id: int) -> AuthUser | None:
    with Session(engine) as session:
        user = session.get(User, user_id)
        return None if user is None else _auth_user(user)


def get_user(engine: Engine, user_id: int) -> dict[str, Any]:
    with Session(engine) as session:
        return user_to_json(_get(session, user_id))


def list_users(
    engine: Engine,
    *,
    page: int,
    page_size: int,
    role: str | None = None,
    enabled: bool | None = None,
    search: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of users by id, and the number matching; ``search`` matches a part of the username."""
    offset = page_offset(page, page_size)
    conditions: list[sa.ColumnElement[bool]] = []
    if role is not None:
        conditions.append(User.role == role)
    if enabled is not None:
        conditions.append(User.enabled == enabled)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(User.username.ilike(f"%{escaped}%", escape="\\"))
    with read_transaction(engine) as conn, Session(bind=conn) as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(User).where(*conditions)) or 0
        rows = session.scalars(
            sa.select(User).where(*conditions).order_by(User.id).limit(page_size).offset(offset)
        )
        return [user_to_json(user) for user in rows], int(total)


# --- writes -------------------------------------------------------------------------------------------------


def _username(value: str) -> str:
    if not isinstance(value, str) or not _USERNAME.fullmatch(value := value.strip()):
        raise ValidationError(
            "a username is 1 to 100 letters, digits or . _ @ + - and starts with a letter or digit"
        )
    return value


def _email(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value := value.strip()) > 320 or not _EMAIL.fullmatch(value):
        raise ValidationError("the email address is malformed")
    return value


def _role(actor: Actor, role: str) -> str:
    if not is_role(role):
        raise ValidationError(f"the role must be one of {', '.join(ROLES)}")
    if not can_grant(actor.permissions, role):
        raise ForbiddenError(f"only an account holding every permission of {role} may grant it")
    return role


def _get(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"user {user_id} not found")
    return user


def _get_manageable(session: Session, actor: Actor, user_id: int) -> User:
    user = _get(session, user_id)
    if not can_grant(actor.permissions, user.role) and is_role(user.role):
        raise ForbiddenError(f"only an account holding every permission of {user.role} may change this user")
    return user


def _username_free(session: Session, username: str, *, except_id: int | None = None) -> None:
    stmt = sa.select(User.id).where(User.username == username)
    if except_id is not None:
        stmt = stmt.where(User.id != except_id)
    if session.scalars(stmt).first() is not None:
        raise ConflictError(f"user {username!r} already exists")


def create_user(
    engine: Engine,
    *,
    username: str,
    password: str | None = None,
    email: str | None = None,
    role: str = "user",
    enabled: bool = True,
    budget: Decimal | None = None,
    budget_period: str | None = None,
    actor: Actor = SYSTEM,
) -> dict[str, Any]:
    """Create a user; the password (if any) is hashed here with argon2id."""
    username = _username(username)
    email = _email(email)
    role = _role(actor, role)
    budget = check.money(budget, "budget")
    budget_period = check.budget_period(budget_period)
    password_hash = None if password is None else hash_password(password)
    with config_session(engine) as session:
        _username_free(session, username)
        user = User(
            username=username,
            email=email,
            role=role,
            password_hash=password_hash,
            enabled=enabled,
            budget=budget,
            budget_period=budget_period,
        )
        session.add(user)
        try:
            session.flush()
        except sa.exc.IntegrityError:
            raise ConflictError(f"user {username!r} already exists") from None
        view = user_to_json(user)
        audit(session, actor, "create", "user", user.id, after=view)
        return view


def update_user(
    engine: Engine, user_id: int, changes: Mapping[str, Any], *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    """Apply ``changes`` (any of username, email, role, enabled, password, budget, budget_period); revokes the user's tokens when the
    password, role or enabled state changes."""
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValidationError(f"unknown user fields: {', '.join(sorted(unknown))}")
    clean: dict[str, Any] = {}
    if "username" in changes:
        clean["username"] = _username(changes["username"])
    if "email" in changes:
        clean["email"] = _email(changes["email"])
    if "role" in changes:
        clean["role"] = _role(actor, changes["role"])
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationError("enabled must be true or false")
        clean["enabled"] = changes["enabled"]
    if "budget" in changes:
        clean["budget"] = check.money(changes["budget"], "budget")
    if "budget_period" in changes:
        clean["budget_period"] = check.budget_period(changes["budget_period"])
    if "password" in changes and not isinstance(changes["password"], str):
        raise ValidationError("the password must be a string")
    password_hash = hash_password(changes["password"]) if "password" in changes else None
    with config_session(engine) as session:
        user = _get_manageable(session, actor, user_id)
        if user.id == actor.user_id and (
            clean.get("enabled") is False or clean.get("role", user.role) != user.role
        ):
            raise ConflictError("you cannot disable your own account or change your own role")
        before = user_to_json(user)
        if "username" in clean and clean["username"] != user.username:
            _username_free(session, clean["username"], except_id=user.id)
        revoke = (
            password_hash is not None
            or clean.get("role", user.role) != user.role
            or clean.get("enabled", user.enabled) != user.enabled
        )
        for field, value in clean.items():
            setattr(user, field, value)
        if password_hash is not None:
            user.password_hash = password_hash
        if revoke:
            user.token_version += 1
        try:
            session.flush()
        except sa.exc.IntegrityError:
            raise ConflictError("a user with that username already exists") from None
        after = user_to_json(user)
        if password_hash is not None:
            after["password_changed"] = True
        audit(session, actor, "update", "user", user.id, before=before, after=after)
        return user_to_json(user)


def set_user_enabled(engine: Engine, user_id: int, enabled: bool, *, actor: Actor = SYSTEM) -> dict[str, Any]:
    """Enable or disable a user; a disabled user's gateway keys stop working at the next snapshot."""
    return update_user(engine, user_id, {"enabled": enabled}, actor=actor)


def delete_user(engine: Engine, user_id: int, *, actor: Actor = SYSTEM) -> None:
    """Delete a user with their provider keys and gateway keys (their request history stays)."""
    with config_session(engine) as session:
        user = _get_manageable(session, actor, user_id)
        if user.id == actor.user_id:
            raise ConflictError("you cannot delete your own account")
        before = user_to_json(user)
        session.execute(sa.delete(User).where(User.id == user.id))
        audit(session, actor, "delete", "user", user_id, before=before)


def change_own_password(engine: Engine, user_id: int, current: str, new: str, *, actor: Actor) -> AuthUser:
    """Self-service password change: the current password must match; every older token is revoked."""
    found = get_auth_user(engine, user_id)
    if not verify_password(None if found is None else found.password_hash, current) or found is None:
        raise ForbiddenError("the current password is wrong")
    new_hash = hash_password(new)
    with write_session(engine) as session:
        user = _get(session, user_id)
        user.password_hash = new_hash
        user.token_version += 1
        session.flush()
        audit(session, actor, "change_password", "user", user.id, after={"password_changed": True})
        return _auth_user(user)


def revoke_tokens(engine: Engine, user_id: int, *, actor: Actor, action: str = "logout") -> None:
    """Bump the user's token version: every access and refresh token issued before stops working."""
    with write_session(engine) as session:
        user = _get(session, user_id)
        user.token_version += 1
        session.flush()
        audit(session, actor, action, "user", user.id, after={"token_version": user.token_version})


def record_login(engine: Engine, user_id: int, *, actor: Actor, password: str | None = None) -> None:
    """The audit row of a successful login; upgrades the stored hash when its parameters are outdated."""
    with write_session(engine) as session:
        user = _get(session, user_id)
        if password is not None and user.password_hash is not None and needs_rehash(user.password_hash):
            user.password_hash = _HASHER.hash(password)
        audit(session, actor, "login", "user", user.id)


def record_unlock(engine: Engine, user_id: int, *, actor: Actor) -> str:
    """The audit row of an administrator unlocking an account throttled after failed logins; its username."""
    with write_session(engine) as session:
        user = _get_manageable(session, actor, user_id)
        audit(session, actor, "unlock", "user", user.id)
        return user.username


def ensure_bootstrap_admin(engine: Engine, password: str | None) -> str | None:
    """On a database without users, create ``admin`` (super_admin) and return its password if it was
    generated here (the caller shows it once); ``None`` when users exist or the password was given.

    There is no default password: it is ``password`` (``TRIOPROXY_ADMIN_PASSWORD``) or a random one.
    """
    if password is not None and len(password) < MIN_PASSWORD:
        raise ConfigError(f"TRIOPROXY_ADMIN_PASSWORD must have at least {MIN_PASSWORD} characters")
    with Session(engine) as session:
        if session.scalars(sa.select(User.id).limit(1)).first() is not None:
            return None
    generated = secrets.token_urlsafe(18) if password is None else None
    chosen = password if password is not None else generated
    assert chosen is not None
    try:
        create_user(
            engine,
            username=BOOTSTRAP_USERNAME,
            password=chosen,
            role="super_admin",
            actor=Actor(user_id=None, name="bootstrap", permissions=SYSTEM.permissions),
        )
    except ConflictError:
        return None  # another instance bootstrapped at the same moment: its password stands
    return generated
