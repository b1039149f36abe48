"""``/api/auth``: log in, refresh, log out (everywhere), change one's password, who am I."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import document_response, tag, validate_request, validate_response

from admin.auth import login, refresh
from admin.rbac import Access, client_ip, current_actor, current_principal, requires
from admin.schemas import LoginIn, MeOut, NoContent, PasswordChangeIn, RefreshIn, TokenOut
from admin.state import get_state
from trioproxy.store.users import change_own_password, get_user, revoke_tokens

bp = Blueprint("auth", __name__, url_prefix="/api/auth")


@bp.post("/login")
@requires(Access.PUBLIC)
@tag(["auth"])
@validate_request(LoginIn)
@validate_response(TokenOut)
async def login_route(data: LoginIn) -> dict[str, Any]:
    """Log in with a username and password.

    Returns an access token (15 minutes) and a refresh token (7 days). Wrong passwords and unknown users get the
    same 401; repeated failures are throttled per account and per client address (429 with Retry-After).
    """
    state = get_state()
    user, tokens = await login(state, data.username, data.password, client_ip())
    return {**tokens, "user": await state.db(get_user, state.engine, user.id)}


@bp.post("/refresh")
@requires(Access.PUBLIC)
@tag(["auth"])
@validate_request(RefreshIn)
@validate_response(TokenOut)
async def refresh_route(data: RefreshIn) -> dict[str, Any]:
    """Trade a refresh token for a new token pair (a refresh token is never accepted as an access token)."""
    state = get_state()
    user, tokens = await refresh(state, data.refresh_token)
    return {**tokens, "user": await state.db(get_user, state.engine, user.id)}


@bp.post("/logout")
@requires(Access.AUTHENTICATED)
@tag(["auth"])
@document_response(NoContent, 204)
async def logout_route() -> tuple[str, int]:
    """Log out everywhere: every access and refresh token of the caller stops working."""
    state = get_state()
    await state.db(revoke_tokens, state.engine, current_principal().user_id, actor=current_actor())
    return "", 204


@bp.get("/me")
@requires(Access.AUTHENTICATED)
@tag(["auth"])
@validate_response(MeOut)
async def me_route() -> dict[str, Any]:
    """The caller's account and the permissions of its role."""
    state = get_state()
    principal = current_principal()
    user = await state.db(get_user, state.engine, principal.user_id)
    return {"user": user, "permissions": sorted(p.value for p in principal.permissions)}


@bp.post("/password")
@requires(Access.AUTHENTICATED)
@tag(["auth"])
@validate_request(PasswordChangeIn)
@validate_response(TokenOut)
async def password_route(data: PasswordChangeIn) -> dict[str, Any]:
    """Change one's own password (the current one is required); every older token is revoked and a new pair
    is returned."""
    state = get_state()
    principal = current_principal()
    user = await state.cpu(
        change_own_password,
        state.engine,
        principal.user_id,
        data.current_password,
        data.new_password,
        actor=current_actor(),
    )
    state.throttle.unlock(user.username)
    return {**state.tokens.pair(user), "user": await state.db(get_user, state.engine, user.id)}
