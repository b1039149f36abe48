"""``/api/providers``: upstream providers (global objects; administrators change them)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import document_response, tag, validate_querystring, validate_request, validate_response

from admin import pagination
from admin.rbac import current_actor, requires
from admin.schemas import (
    NoContent,
    Page,
    ProviderCreateIn,
    ProviderOut,
    ProviderQuery,
    ProviderUpdateIn,
    Timeouts,
)
from admin.state import get_state
from trioproxy.roles import Permission
from trioproxy.store import provisioning

bp = Blueprint("providers", __name__, url_prefix="/api/providers")

_TIMEOUT_COLUMNS = {
    "connect": "connect_timeout",
    "first_byte": "first_byte_timeout",
    "idle": "idle_timeout",
    "total": "total_timeout",
}


def provider_out(view: dict[str, Any]) -> dict[str, Any]:
    """The service layer's flat provider view with its timeouts grouped, as the API shows them."""
    out = {key: value for key, value in view.items() if key not in _TIMEOUT_COLUMNS.values()}
    out["timeouts"] = {short: view.get(column) for short, column in _TIMEOUT_COLUMNS.items()}
    return out


def _timeout_changes(timeouts: Timeouts | None) -> dict[str, Any]:
    if timeouts is None:  # "timeouts": null restores every default
        return dict.fromkeys(_TIMEOUT_COLUMNS.values())
    return {
        _TIMEOUT_COLUMNS[short]: value
        for short, value in timeouts.model_dump(include=timeouts.model_fields_set).items()
    }


@bp.get("")
@requires(Permission.VIEW_PROVIDERS)
@tag(["providers"])
@validate_querystring(ProviderQuery)
@validate_response(Page[ProviderOut])
async def list_providers(query_args: ProviderQuery) -> dict[str, Any]:
    """List providers."""
    state = get_state()
    page, size = pagination.bounds(query_args)
    items, total = await state.db(
        provisioning.list_providers_page,
        state.engine,
        page=page,
        page_size=size,
        kind=query_args.kind,
        enabled=query_args.enabled,
    )
    return pagination.page([provider_out(item) for item in items], total, page, size)


@bp.post("")
@requires(Permission.MANAGE_PROVIDERS)
@tag(["providers"])
@validate_request(ProviderCreateIn)
@validate_response(ProviderOut, 201)
async def create_provider(data: ProviderCreateIn) -> tuple[dict[str, Any], int]:
    """Add a provider. The base URL passes the SSRF guard: never link-local or cloud-metadata addresses; loopback
    and private ranges only when TRIOPROXY_ALLOW_PRIVATE_UPSTREAMS=true."""
    state = get_state()
    created = await state.db(
        provisioning.add_provider,
        state.engine,
        name=data.name,
        kind=data.kind,
        base_url=data.base_url,
        headers=data.headers,
        connect_timeout=data.timeouts.connect,
        first_byte_timeout=data.timeouts.first_byte,
        idle_timeout=data.timeouts.idle,
        total_timeout=data.timeouts.total,
        enabled=data.enabled,
        allow_private=state.settings.allow_private_upstreams,
        actor=current_actor(),
    )
    return provider_out(created), 201


@bp.get("/<id:provider_id>")
@requires(Permission.VIEW_PROVIDERS)
@tag(["providers"])
@validate_response(ProviderOut)
async def get_provider(provider_id: int) -> dict[str, Any]:
    """One provider."""
    state = get_state()
    return provider_out(await state.db(provisioning.get_provider, state.engine, provider_id))


@bp.patch("/<id:provider_id>")
@requires(Permission.MANAGE_PROVIDERS)
@tag(["providers"])
@validate_request(ProviderUpdateIn)
@validate_response(ProviderOut)
async def update_provider(provider_id: int, data: ProviderUpdateIn) -> dict[str, Any]:
    """Change a provider (its kind is fixed). Live on the proxy within a second."""
    state = get_state()
    changes = data.sent()
    if "timeouts" in changes:
        changes.pop("timeouts")
        changes.update(_timeout_changes(data.timeouts))
    updated = await state.db(
        provisioning.update_provider,
        state.engine,
        provider_id,
        changes,
        allow_private=state.settings.allow_private_upstreams,
        actor=current_actor(),
    )
    return provider_out(updated)


@bp.delete("/<id:provider_id>")
@requires(Permission.MANAGE_PROVIDERS)
@tag(["providers"])
@document_response(NoContent, 204)
async def delete_provider(provider_id: int) -> tuple[str, int]:
    """Delete a provider and its provider keys; refused (409) while gateway keys use it."""
    state = get_state()
    await state.db(provisioning.delete_provider, state.engine, provider_id, actor=current_actor())
    return "", 204
