"""Route-level access control: every route declares what it needs with :func:`requires`.

``@requires(Permission.X)`` authenticates the bearer token, loads the caller (its role decides its permissions,
read fresh from the database on every request) and answers 403 without the permission;
``@requires(Access.AUTHENTICATED)`` needs a valid token only (one's own profile, logout);
``@requires(Access.PUBLIC)`` needs nothing (login, refresh, the health probe for load balancers).

:func:`check_routes` runs when the app is built and refuses to start an app with a route that declares nothing,
so a forgotten decorator is a start-up error, not an open endpoint. :func:`route_table` lists every route with
its declaration: the permission-matrix tests are generated from it.

Object-level tenancy (your own keys only, 404 for others') is the service layer's job
(:class:`trioproxy.store.actor.Actor`); :func:`current_actor` builds the actor of the current request.

Decorator order: ``@blueprint.<method>(...)`` outermost, then ``@requires(...)``, then quart-schema's
``@validate_*``: authentication runs before the body is validated, so an anonymous caller learns nothing from
validation errors.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from quart import g, request
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE
from quart_trio import QuartTrio

from admin.auth import Principal, authenticate
from admin.errors import DOCUMENTED_ERRORS, forbidden
from admin.schemas import ErrorOut
from admin.state import get_state
from trioproxy.errors import NotFoundError
from trioproxy.headers import client_address
from trioproxy.roles import Permission
from trioproxy.store.actor import Actor

P = ParamSpec("P")
R = TypeVar("R")
ACCESS_ATTRIBUTE = "_trioproxy_access"
MAX_ID = 2**31 - 1
_SECURITY_ATTRIBUTE = "_quart_schema_security_tag"
# Endpoints that quart-schema and Quart add themselves (documentation pages, static files).
_FRAMEWORK_ENDPOINTS = frozenset({"openapi", "redoc_ui", "scalar_ui", "swagger_ui", "static"})


class Access(enum.Enum):
    PUBLIC = "public"
    AUTHENTICATED = "authenticated"


Requirement = Permission | Access


def requires(requirement: Requirement) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Declare (and enforce) what a route needs; also documents its security and error responses."""

    def decorator(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if requirement is not Access.PUBLIC:
                principal = await authenticate(get_state(), request.headers.get("Authorization"))
                if isinstance(requirement, Permission) and requirement not in principal.permissions:
                    raise forbidden(f"this needs the {requirement.value} permission")
                g.principal = principal
            for name, value in kwargs.items():
                # Path ids (IdConverter) outside what a row id can be are simply not found.
                if name.endswith("_id") and isinstance(value, int) and not 1 <= value <= MAX_ID:
                    raise NotFoundError(f"{name.removesuffix('_id').replace('_', ' ')} {value} not found")
            return await func(*args, **kwargs)

        setattr(wrapper, ACCESS_ATTRIBUTE, requirement)
        responses = dict(getattr(func, QUART_SCHEMA_RESPONSE_ATTRIBUTE, {}))
        for status in DOCUMENTED_ERRORS:
            responses.setdefault(status, (ErrorOut, None))
        setattr(wrapper, QUART_SCHEMA_RESPONSE_ATTRIBUTE, responses)
        if requirement is Access.PUBLIC:
            setattr(wrapper, _SECURITY_ATTRIBUTE, [])
        return wrapper

    return decorator


def current_principal() -> Principal:
    principal = g.get("principal")
    if not isinstance(principal, Principal):
        raise RuntimeError("current_principal() on a route without @requires(...)")
    return principal


def client_ip() -> str:
    """The caller's address: the socket peer, or the first untrusted X-Forwarded-For hop behind a trusted
    proxy (``TRIOPROXY_TRUSTED_PROXIES``)."""
    peer = request.remote_addr or ""
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()
    ]
    return client_address(peer, headers, get_state().trusted_proxies)


def current_actor() -> Actor:
    return current_principal().actor(client_ip())


@dataclass(frozen=True, slots=True)
class RouteInfo:
    method: str
    rule: str
    endpoint: str
    requirement: Requirement


def route_table(app: QuartTrio) -> list[RouteInfo]:
    """Every (method, rule) of the app with its declared requirement (HEAD and OPTIONS left out)."""
    table = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in _FRAMEWORK_ENDPOINTS:
            continue
        requirement = getattr(app.view_functions[rule.endpoint], ACCESS_ATTRIBUTE)
        for method in sorted(rule.methods or ()):
            if method not in {"HEAD", "OPTIONS"}:
                table.append(RouteInfo(method, rule.rule, rule.endpoint, requirement))
    return table


def check_routes(app: QuartTrio) -> None:
    """Refuse an app with a route that does not declare its requirement."""
    missing = [
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in _FRAMEWORK_ENDPOINTS
        and not hasattr(app.view_functions[rule.endpoint], ACCESS_ATTRIBUTE)
    ]
    if missing:
        raise RuntimeError(f"admin routes without @requires(...): {', '.join(sorted(missing))}")
