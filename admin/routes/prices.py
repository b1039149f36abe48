"""``/api/prices``: model prices in USD per million tokens (decimals as strings), live within a second."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import document_response, tag, validate_querystring, validate_request, validate_response

from admin import pagination
from admin.rbac import current_actor, requires
from admin.schemas import NoContent, Page, PriceCreateIn, PriceOut, PriceQuery, PriceUpdateIn
from admin.state import get_state
from trioproxy.roles import Permission
from trioproxy.store import price_admin

bp = Blueprint("prices", __name__, url_prefix="/api/prices")


@bp.get("")
@requires(Permission.VIEW_PRICES)
@tag(["prices"])
@validate_querystring(PriceQuery)
@validate_response(Page[PriceOut])
async def list_prices(query_args: PriceQuery) -> dict[str, Any]:
    """List model prices, by provider kind and model name."""
    state = get_state()
    page, size = pagination.bounds(query_args)
    items, total = await state.db(
        price_admin.list_prices_page,
        state.engine,
        page=page,
        page_size=size,
        provider_kind=query_args.provider_kind,
        search=query_args.search,
    )
    return pagination.page(items, total, page, size)


@bp.post("")
@requires(Permission.MANAGE_PRICES)
@tag(["prices"])
@validate_request(PriceCreateIn)
@validate_response(PriceOut, 201)
async def create_price(data: PriceCreateIn) -> tuple[dict[str, Any], int]:
    """Add the price of a model (409 if that provider kind and model already have one)."""
    state = get_state()
    created = await state.db(
        price_admin.create_price,
        state.engine,
        provider_kind=data.provider_kind,
        model=data.model,
        input_per_million=data.input_per_million,
        output_per_million=data.output_per_million,
        cache_read_per_million=data.cache_read_per_million,
        cache_write_per_million=data.cache_write_per_million,
        tiers=[tier.model_dump() for tier in data.tiers],
        actor=current_actor(),
    )
    return created, 201


@bp.get("/<id:price_id>")
@requires(Permission.VIEW_PRICES)
@tag(["prices"])
@validate_response(PriceOut)
async def get_price(price_id: int) -> dict[str, Any]:
    """One model price."""
    state = get_state()
    return await state.db(price_admin.get_price, state.engine, price_id)


@bp.patch("/<id:price_id>")
@requires(Permission.MANAGE_PRICES)
@tag(["prices"])
@validate_request(PriceUpdateIn)
@validate_response(PriceOut)
async def update_price(price_id: int, data: PriceUpdateIn) -> dict[str, Any]:
    """Change a price's rates or tiers (the provider kind and model are fixed)."""
    state = get_state()
    return await state.db(
        price_admin.update_price, state.engine, price_id, data.sent(), actor=current_actor()
    )


@bp.delete("/<id:price_id>")
@requires(Permission.MANAGE_PRICES)
@tag(["prices"])
@document_response(NoContent, 204)
async def delete_price(price_id: int) -> tuple[str, int]:
    """Delete a price (requests of that model are then recorded without a cost)."""
    state = get_state()
    await state.db(price_admin.delete_price, state.engine, price_id, actor=current_actor())
    return "", 204
