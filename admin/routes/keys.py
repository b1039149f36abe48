"""``/api/keys``: gateway keys, the bearer tokens clients send to the proxy on :8080.

The full key is returned once, under ``key``, by create and regenerate; afterwards only its prefix. The pool may
only hold keys of the gateway key's provider that its owner may use (the owner's own and shared ones). Limits and
budgets are set by administrators only. Every change is live on the proxy within a second.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import document_response, tag, validate_querystring, validate_request, validate_response

from admin import pagination
from admin.rbac import current_actor, requires
from admin.schemas import (
    GatewayKeyCreatedOut,
    GatewayKeyCreateIn,
    GatewayKeyOut,
    GatewayKeyQuery,
    GatewayKeyUpdateIn,
    NoContent,
    Page,
)
from admin.state import get_state
from trioproxy.roles import Permission
from trioproxy.store import gateway_key_store
from trioproxy.store.actor import resolve_owner

bp = Blueprint("keys", __name__, url_prefix="/api/keys")


@bp.get("")
@requires(Permission.VIEW_KEYS)
@tag(["gateway keys"])
@validate_querystring(GatewayKeyQuery)
@validate_response(Page[GatewayKeyOut])
async def list_keys(query_args: GatewayKeyQuery) -> dict[str, Any]:
    """List the gateway keys the caller may see (prefixes only)."""
    state = get_state()
    page, size = pagination.bounds(query_args)
    items, total = await state.db(
        gateway_key_store.list_gateway_keys_page,
        state.engine,
        actor=current_actor(),
        page=page,
        page_size=size,
        provider_id=query_args.provider_id,
        owner_id=query_args.owner_id,
        enabled=query_args.enabled,
    )
    return pagination.page(items, total, page, size)


@bp.post("")
@requires(Permission.MANAGE_KEYS)
@tag(["gateway keys"])
@validate_request(GatewayKeyCreateIn)
@validate_response(GatewayKeyCreatedOut, 201)
async def create_key(data: GatewayKeyCreateIn) -> tuple[dict[str, Any], int]:
    """Create a gateway key; the answer carries the full key under ``key``, shown this once."""
    state = get_state()
    actor = current_actor()
    sent = data.sent()
    owner = resolve_owner(actor, data.owner_id, given="owner_id" in sent)
    # On creation null means "no limit", the default: only actual limits need an administrator.
    limits = {field: sent[field] for field in gateway_key_store.LIMIT_FIELDS if sent.get(field) is not None}
    created = await state.db(
        gateway_key_store.create_gateway_key,
        state.engine,
        name=data.name,
        provider=data.provider_id,
        provider_keys=data.provider_key_ids,
        owner_id=owner,
        strategy=data.strategy,
        retry_count=data.retry_count,
        allowed_models=data.allowed_models,
        expires_at=data.expires_at,
        first_byte_timeout=data.first_byte_timeout,
        total_timeout=data.total_timeout,
        enabled=data.enabled,
        limits=limits,
        actor=actor,
    )
    return created, 201


@bp.get("/<id:key_id>")
@requires(Permission.VIEW_KEYS)
@tag(["gateway keys"])
@validate_response(GatewayKeyOut)
async def get_key(key_id: int) -> dict[str, Any]:
    """One gateway key (its prefix, never the key)."""
    state = get_state()
    return await state.db(gateway_key_store.get_gateway_key, state.engine, key_id, actor=current_actor())


@bp.patch("/<id:key_id>")
@requires(Permission.MANAGE_KEYS)
@tag(["gateway keys"])
@validate_request(GatewayKeyUpdateIn)
@validate_response(GatewayKeyOut)
async def update_key(key_id: int, data: GatewayKeyUpdateIn) -> dict[str, Any]:
    """Change a gateway key (its provider and owner are fixed); ``null`` clears a nullable setting."""
    state = get_state()
    return await state.db(
        gateway_key_store.update_gateway_key, state.engine, key_id, data.sent(), actor=current_actor()
    )


@bp.post("/<id:key_id>/regenerate")
@requires(Permission.MANAGE_KEYS)
@tag(["gateway keys"])
@validate_response(GatewayKeyCreatedOut)
async def regenerate_key(key_id: int) -> dict[str, Any]:
    """Replace the key's secret: the old key stops working within a second, the new one is shown once."""
    state = get_state()
    return await state.db(
        gateway_key_store.regenerate_gateway_key, state.engine, key_id, actor=current_actor()
    )


@bp.delete("/<id:key_id>")
@requires(Permission.MANAGE_KEYS)
@tag(["gateway keys"])
@document_response(NoContent, 204)
async def delete_key(key_id: int) -> tuple[str, int]:
    """Delete a gateway key (its request history stays)."""
    state = get_state()
    await state.db(gateway_key_store.delete_gateway_key, state.engine, key_id, actor=current_actor())
    return "", 204
