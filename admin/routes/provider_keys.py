"""``/api/provider-keys``: upstream API keys, encrypted at rest, write-only (only a masked hint comes back).

Tenancy: a caller without ``view_all_tenants`` sees only its own keys; another user's key answers 404.
Administrators may create a key for another user (``owner_id``) or a shared one (``owner_id: null``) that every
user's gateway keys may pool.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import document_response, tag, validate_querystring, validate_request, validate_response

from admin import pagination
from admin.probe import probe_key
from admin.rbac import current_actor, requires
from admin.schemas import (
    NoContent,
    Page,
    ProbeOut,
    ProviderKeyCreateIn,
    ProviderKeyOut,
    ProviderKeyQuery,
    ProviderKeyUpdateIn,
)
from admin.state import get_state
from trioproxy.roles import Permission
from trioproxy.store import provisioning
from trioproxy.store.actor import resolve_owner

bp = Blueprint("provider_keys", __name__, url_prefix="/api/provider-keys")


@bp.get("")
@requires(Permission.VIEW_PROVIDER_KEYS)
@tag(["provider keys"])
@validate_querystring(ProviderKeyQuery)
@validate_response(Page[ProviderKeyOut])
async def list_provider_keys(query_args: ProviderKeyQuery) -> dict[str, Any]:
    """List the provider keys the caller may see (secrets masked)."""
    state = get_state()
    page, size = pagination.bounds(query_args)
    items, total = await state.db(
        provisioning.list_provider_keys_page,
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
@requires(Permission.MANAGE_PROVIDER_KEYS)
@tag(["provider keys"])
@validate_request(ProviderKeyCreateIn)
@validate_response(ProviderKeyOut, 201)
async def create_provider_key(data: ProviderKeyCreateIn) -> tuple[dict[str, Any], int]:
    """Store a provider key (encrypted with AES-256-GCM); the answer shows only a masked hint of the secret."""
    state = get_state()
    actor = current_actor()
    owner = resolve_owner(actor, data.owner_id, given="owner_id" in data.model_fields_set)
    created = await state.db(
        provisioning.add_provider_key,
        state.engine,
        state.box,
        provider=data.provider_id,
        name=data.name,
        secret=data.secret,
        weight=data.weight,
        owner_id=owner,
        enabled=data.enabled,
        rpm_limit=data.rpm_limit,
        tpm_limit=data.tpm_limit,
        rpd_limit=data.rpd_limit,
        actor=actor,
    )
    return created, 201


@bp.get("/<id:key_id>")
@requires(Permission.VIEW_PROVIDER_KEYS)
@tag(["provider keys"])
@validate_response(ProviderKeyOut)
async def get_provider_key(key_id: int) -> dict[str, Any]:
    """One provider key (secret masked)."""
    state = get_state()
    return await state.db(provisioning.get_provider_key, state.engine, key_id, actor=current_actor())


@bp.patch("/<id:key_id>")
@requires(Permission.MANAGE_PROVIDER_KEYS)
@tag(["provider keys"])
@validate_request(ProviderKeyUpdateIn)
@validate_response(ProviderKeyOut)
async def update_provider_key(key_id: int, data: ProviderKeyUpdateIn) -> dict[str, Any]:
    """Change a provider key. ``secret`` is optional: leave it out to keep the stored key."""
    state = get_state()
    return await state.db(
        provisioning.update_provider_key, state.engine, state.box, key_id, data.sent(), actor=current_actor()
    )


@bp.delete("/<id:key_id>")
@requires(Permission.MANAGE_PROVIDER_KEYS)
@tag(["provider keys"])
@document_response(NoContent, 204)
async def delete_provider_key(key_id: int) -> tuple[str, int]:
    """Delete a provider key; it leaves every gateway key pool it was in."""
    state = get_state()
    await state.db(provisioning.delete_provider_key, state.engine, key_id, actor=current_actor())
    return "", 204


@bp.post("/<id:key_id>/test")
@requires(Permission.MANAGE_PROVIDER_KEYS)
@tag(["provider keys"])
@validate_response(ProbeOut)
async def test_provider_key(key_id: int) -> dict[str, Any]:
    """Check the key against the provider without spending tokens (it lists the models): status, latency and
    the number of models. The provider's answer itself is never shown."""
    state = get_state()
    actor = current_actor()
    target = await state.db(provisioning.probe_target, state.engine, state.box, key_id, actor=actor)
    outcome = await probe_key(
        target,
        allow_private=state.settings.allow_private_upstreams,
        user_agent=state.settings.upstream.user_agent,
    )
    result = outcome.to_json()
    await state.db(provisioning.record_probe, state.engine, key_id, result, actor=actor)
    return result
