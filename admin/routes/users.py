"""``/api/users``: user accounts (administrators), and unlocking an account the login throttle locked."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import document_response, tag, validate_querystring, validate_request, validate_response

from admin import pagination
from admin.rbac import current_actor, requires
from admin.schemas import NoContent, Page, UserCreateIn, UserOut, UserQuery, UserUpdateIn
from admin.state import get_state
from trioproxy.roles import Permission
from trioproxy.store import users

bp = Blueprint("users", __name__, url_prefix="/api/users")


@bp.get("")
@requires(Permission.VIEW_USERS)
@tag(["users"])
@validate_querystring(UserQuery)
@validate_response(Page[UserOut])
async def list_users(query_args: UserQuery) -> dict[str, Any]:
    """List users, optionally filtered by role, enabled state or a part of the username."""
    state = get_state()
    page, size = pagination.bounds(query_args)
    items, total = await state.db(
        users.list_users,
        state.engine,
        page=page,
        page_size=size,
        role=query_args.role,
        enabled=query_args.enabled,
        search=query_args.search,
    )
    return pagination.page(items, total, page, size)


@bp.post("")
@requires(Permission.MANAGE_USERS)
@tag(["users"])
@validate_request(UserCreateIn)
@validate_response(UserOut, 201)
async def create_user(data: UserCreateIn) -> tuple[dict[str, Any], int]:
    """Create a user. Only an account holding every permission of a role may grant it."""
    state = get_state()
    created = await state.cpu(
        users.create_user,
        state.engine,
        username=data.username,
        password=data.password,
        email=data.email,
        role=data.role,
        enabled=data.enabled,
        budget=data.budget,
        budget_period=data.budget_period,
        actor=current_actor(),
    )
    return created, 201


@bp.get("/<id:user_id>")
@requires(Permission.VIEW_USERS)
@tag(["users"])
@validate_response(UserOut)
async def get_user(user_id: int) -> dict[str, Any]:
    """One user."""
    state = get_state()
    return await state.db(users.get_user, state.engine, user_id)


@bp.patch("/<id:user_id>")
@requires(Permission.MANAGE_USERS)
@tag(["users"])
@validate_request(UserUpdateIn)
@validate_response(UserOut)
async def update_user(user_id: int, data: UserUpdateIn) -> dict[str, Any]:
    """Change a user. A new password, role or enabled state revokes the user's tokens; disabling also stops
    the user's gateway keys on the proxy within a second."""
    state = get_state()
    updated = await state.cpu(users.update_user, state.engine, user_id, data.sent(), actor=current_actor())
    if data.password is not None:
        state.throttle.unlock(updated["username"])
    return updated


@bp.delete("/<id:user_id>")
@requires(Permission.MANAGE_USERS)
@tag(["users"])
@document_response(NoContent, 204)
async def delete_user(user_id: int) -> tuple[str, int]:
    """Delete a user together with their provider keys and gateway keys (request history stays)."""
    state = get_state()
    await state.db(users.delete_user, state.engine, user_id, actor=current_actor())
    return "", 204


@bp.post("/<id:user_id>/unlock")
@requires(Permission.MANAGE_USERS)
@tag(["users"])
@document_response(NoContent, 204)
async def unlock_user(user_id: int) -> tuple[str, int]:
    """Clear the login throttle of a user's account (after too many failed logins)."""
    state = get_state()
    username = await state.db(users.record_unlock, state.engine, user_id, actor=current_actor())
    state.throttle.unlock(username)
    return "", 204
