"""Model prices as admin-API objects: list, read, create, change, delete, each write audited.

Prices are configuration: each write bumps the config version in its transaction, so the proxy prices the
next request with the new numbers. A price is identified by (provider kind, model); those two are fixed once
created (delete and create to move a price). Decimals travel as strings, never through floats; tiers are stored
as :func:`trioproxy.store.prices.tiers_to_json` writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from trioproxy.errors import ConflictError, NotFoundError, ValidationError
from trioproxy.pricing import PriceTier
from trioproxy.store import validation as check
from trioproxy.store.actor import SYSTEM, Actor, audit
from trioproxy.store.db import config_session, read_transaction
from trioproxy.store.lookups import flush_unique, reject_unknown
from trioproxy.store.models import ModelPriceRow, utcnow
from trioproxy.store.prices import tiers_to_json
from trioproxy.store.request_query import page_offset

_RATES = ("input_per_million", "output_per_million", "cache_read_per_million", "cache_write_per_million")
_REQUIRED_RATES = frozenset({"input_per_million", "output_per_million"})
_UPDATABLE = frozenset({*_RATES, "tiers"})
_MAX_TIERS = 20


def price_to_json(row: ModelPriceRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "provider_kind": row.provider_kind,
        "model": row.model,
        **{rate: check.json_value(getattr(row, rate)) for rate in _RATES},
        "tiers": [dict(tier) for tier in row.tiers or []],
        "updated_at": check.json_value(row.updated_at),
    }


def _rate(value: Any, what: str, *, required: bool) -> Decimal | None:
    if value is None:
        if required:
            raise ValidationError(f"{what} is required")
        return None
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except ArithmeticError:
        raise ValidationError(f"{what} must be a decimal amount") from None
    return check.money(amount, what)


def _tiers(raw: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if len(raw) > _MAX_TIERS:
        raise ValidationError(f"a price has at most {_MAX_TIERS} tiers")
    tiers = []
    for item in raw:
        minimum = item.get("min_input_tokens")
        if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
            raise ValidationError("a tier's min_input_tokens must be an integer >= 0")
        rates = {
            rate: _rate(item.get(rate), f"a tier's {rate}", required=rate in _REQUIRED_RATES)
            for rate in _RATES
        }
        tiers.append(PriceTier(min_input_tokens=minimum, **rates))  # type: ignore[arg-type]
    if len({tier.min_input_tokens for tier in tiers}) != len(tiers):
        raise ValidationError("two tiers have the same min_input_tokens")
    return tiers_to_json(tuple(sorted(tiers, key=lambda tier: tier.min_input_tokens)))


def _get(session: Session, price_id: int) -> ModelPriceRow:
    row = session.get(ModelPriceRow, price_id)
    if row is None:
        raise NotFoundError(f"price {price_id} not found")
    return row


def list_prices_page(
    engine: Engine, *, page: int, page_size: int, provider_kind: str | None = None, search: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    offset = page_offset(page, page_size)
    conditions: list[sa.ColumnElement[bool]] = []
    if provider_kind is not None:
        conditions.append(ModelPriceRow.provider_kind == check.kind(provider_kind).value)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(ModelPriceRow.model.ilike(f"%{escaped}%", escape="\\"))
    order = (ModelPriceRow.provider_kind, ModelPriceRow.model)
    with read_transaction(engine) as conn, Session(bind=conn) as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(ModelPriceRow).where(*conditions)) or 0
        rows = session.scalars(
            sa.select(ModelPriceRow).where(*conditions).order_by(*order).limit(page_size).offset(offset)
        )
        return [price_to_json(row) for row in rows], int(total)


def get_price(engine: Engine, price_id: int) -> dict[str, Any]:
    with Session(engine) as session:
        return price_to_json(_get(session, price_id))


def create_price(
    engine: Engine,
    *,
    provider_kind: str,
    model: str,
    input_per_million: Decimal,
    output_per_million: Decimal,
    cache_read_per_million: Decimal | None = None,
    cache_write_per_million: Decimal | None = None,
    tiers: Sequence[Mapping[str, Any]] | None = None,
    actor: Actor = SYSTEM,
) -> dict[str, Any]:
    kind = check.kind(provider_kind).value
    model = check.name(model, "model name", max_length=255)
    rates = {
        "input_per_million": _rate(input_per_million, "input_per_million", required=True),
        "output_per_million": _rate(output_per_million, "output_per_million", required=True),
        "cache_read_per_million": _rate(cache_read_per_million, "cache_read_per_million", required=False),
        "cache_write_per_million": _rate(cache_write_per_million, "cache_write_per_million", required=False),
    }
    with config_session(engine) as session:
        taken = session.scalars(
            sa.select(ModelPriceRow.id).where(
                ModelPriceRow.provider_kind == kind, ModelPriceRow.model == model
            )
        ).first()
        if taken is not None:
            raise ConflictError(f"{kind} model {model!r} already has a price")
        row = ModelPriceRow(
            provider_kind=kind, model=model, tiers=_tiers(tiers), updated_at=utcnow(), **rates
        )
        session.add(row)
        flush_unique(session, f"the price of {kind} model {model!r}")
        view = price_to_json(row)
        audit(session, actor, "create", "price", row.id, after=view)
        return view


def update_price(
    engine: Engine, price_id: int, changes: Mapping[str, Any], *, actor: Actor = SYSTEM
) -> dict[str, Any]:
    reject_unknown(changes, _UPDATABLE, "price")
    clean: dict[str, Any] = {}
    for rate in _RATES:
        if rate in changes:
            clean[rate] = _rate(changes[rate], rate, required=rate in _REQUIRED_RATES)
    if "tiers" in changes:
        if changes["tiers"] is None:
            raise ValidationError("tiers must be a list (send [] to remove them all)")
        clean["tiers"] = _tiers(changes["tiers"])
    with config_session(engine) as session:
        row = _get(session, price_id)
        before = price_to_json(row)
        for field, value in clean.items():
            setattr(row, field, value)
        row.updated_at = utcnow()
        session.flush()
        after = price_to_json(row)
        audit(session, actor, "update", "price", row.id, before=before, after=after)
        return after


def delete_price(engine: Engine, price_id: int, *, actor: Actor = SYSTEM) -> None:
    with config_session(engine) as session:
        row = _get(session, price_id)
        before = price_to_json(row)
        session.execute(sa.delete(cast(sa.Table, ModelPriceRow.__table__)).where(ModelPriceRow.id == row.id))
        audit(session, actor, "delete", "price", price_id, before=before)
