"""Roles and permissions: the one catalogue both planes read.

The admin plane checks a route's permission against the caller's role; the snapshot loader asks
:func:`may_use_kind` whether a gateway key's owner may still call its provider's kind (so demoting a user to
``read_only`` stops their keys at the next reload, as disabling does). It lives outside ``admin/`` because the
data plane must never import the control plane.

The catalogue follows the origin system's historical 18-permission RBAC (its ``use_*`` / ``view_*`` /
``manage_*`` strings), split where the origin lumped things together: providers, provider keys and prices each
have their own view and manage permissions, and tenancy is explicit: ``view_all_tenants`` lets a role read every
owner's keys and statistics, ``manage_all_tenants`` lets it change them and assign owners. Without those a
caller sees only its own objects, and another owner's object answers 404 (no existence oracle).

A role may only be granted by someone who holds every permission of that role (see :func:`can_grant`), so an
``admin`` cannot mint a ``super_admin``.

Pure data and functions: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from trioproxy.snapshot import ProviderKind


class Permission(enum.StrEnum):
    USE_OPENAI = "use_openai"
    USE_ANTHROPIC = "use_anthropic"
    USE_GEMINI = "use_gemini"
    VIEW_USERS = "view_users"
    MANAGE_USERS = "manage_users"
    VIEW_KEYS = "view_keys"
    MANAGE_KEYS = "manage_keys"
    VIEW_PROVIDER_KEYS = "view_provider_keys"
    MANAGE_PROVIDER_KEYS = "manage_provider_keys"
    VIEW_PROVIDERS = "view_providers"
    MANAGE_PROVIDERS = "manage_providers"
    VIEW_PRICES = "view_prices"
    MANAGE_PRICES = "manage_prices"
    VIEW_STATISTICS = "view_statistics"
    VIEW_LOGS = "view_logs"
    VIEW_HEALTH = "view_health"
    MANAGE_HEALTH = "manage_health"
    MANAGE_CONFIG = "manage_config"
    VIEW_AUDIT = "view_audit"
    VIEW_ALL_TENANTS = "view_all_tenants"
    MANAGE_ALL_TENANTS = "manage_all_tenants"
    SUPER_ADMIN = "super_admin"


P = Permission

PERMISSION_DESCRIPTIONS: Mapping[Permission, str] = MappingProxyType(
    {
        P.USE_OPENAI: "own gateway keys may call OpenAI-kind providers",
        P.USE_ANTHROPIC: "own gateway keys may call Anthropic-kind providers",
        P.USE_GEMINI: "own gateway keys may call Gemini-kind providers",
        P.VIEW_USERS: "list and read user accounts",
        P.MANAGE_USERS: "create, change and delete user accounts",
        P.VIEW_KEYS: "list and read gateway keys",
        P.MANAGE_KEYS: "create, change, regenerate and delete gateway keys",
        P.VIEW_PROVIDER_KEYS: "list and read provider keys (masked)",
        P.MANAGE_PROVIDER_KEYS: "store, change, test and delete provider keys",
        P.VIEW_PROVIDERS: "list and read providers",
        P.MANAGE_PROVIDERS: "create, change and delete providers",
        P.VIEW_PRICES: "list and read model prices",
        P.MANAGE_PRICES: "create, change and delete model prices",
        P.VIEW_STATISTICS: "read usage statistics",
        P.VIEW_LOGS: "read the request log",
        P.VIEW_HEALTH: "read health and load-balancer state",
        P.MANAGE_HEALTH: "change provider key health states",
        P.MANAGE_CONFIG: "change gateway-wide configuration",
        P.VIEW_AUDIT: "read the audit log",
        P.VIEW_ALL_TENANTS: "read every owner's keys, requests and statistics, not only one's own",
        P.MANAGE_ALL_TENANTS: "change every owner's keys and assign owners",
        P.SUPER_ADMIN: "manage super administrators",
    }
)

USE_PERMISSION: Mapping[ProviderKind, Permission] = MappingProxyType(
    {
        ProviderKind.OPENAI: P.USE_OPENAI,
        ProviderKind.ANTHROPIC: P.USE_ANTHROPIC,
        ProviderKind.GEMINI: P.USE_GEMINI,
    }
)

_USE = (P.USE_OPENAI, P.USE_ANTHROPIC, P.USE_GEMINI)
_READ_OWN = (
    P.VIEW_KEYS,
    P.VIEW_PROVIDER_KEYS,
    P.VIEW_PROVIDERS,
    P.VIEW_PRICES,
    P.VIEW_STATISTICS,
    P.VIEW_LOGS,
    P.VIEW_HEALTH,
)

ROLES: Mapping[str, frozenset[Permission]] = MappingProxyType(
    {
        "super_admin": frozenset(Permission),
        "admin": frozenset(Permission) - {P.SUPER_ADMIN},
        # Sees everything, changes its own keys and key health: the on-call role.
        "operator": frozenset(
            (
                *_USE,
                *_READ_OWN,
                P.VIEW_USERS,
                P.MANAGE_KEYS,
                P.MANAGE_HEALTH,
                P.VIEW_AUDIT,
                P.VIEW_ALL_TENANTS,
            )
        ),
        # Brings or borrows provider keys and runs its own gateway keys; sees only its own objects.
        "user": frozenset((*_USE, *_READ_OWN, P.MANAGE_KEYS, P.MANAGE_PROVIDER_KEYS)),
        "read_only": frozenset(_READ_OWN),
        # Owns gateway keys that work on :8080 but cannot use the admin API beyond its own profile.
        "api_only": frozenset(_USE),
    }
)

ROLE_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "super_admin": "every permission, including managing other super administrators",
        "admin": "everything except managing super administrators",
        "operator": "reads every tenant's objects, statistics and the audit log; manages its own keys and key health",
        "user": "manages its own provider keys and gateway keys and reads its own statistics",
        "read_only": "reads its own keys and statistics; changes nothing",
        "api_only": "owns gateway keys for the proxy; no admin access beyond its own profile",
    }
)


def permissions_of(role: str) -> frozenset[Permission]:
    """The permissions of ``role``; an unknown role (a hand-edited row) has none."""
    return ROLES.get(role, frozenset())


def is_role(role: str) -> bool:
    return role in ROLES


def may_use_kind(role: str, kind: ProviderKind | str) -> bool:
    """Whether gateway keys owned by a user with ``role`` may call providers of ``kind``."""
    try:
        permission = USE_PERMISSION[ProviderKind(kind)]
    except ValueError:
        return False
    return permission in permissions_of(role)


def can_grant(granter: Iterable[Permission], role: str) -> bool:
    """Whether someone holding ``granter`` may give ``role`` to an account (or manage an account with it)."""
    return is_role(role) and permissions_of(role) <= frozenset(granter)
