"""Model prices in the database: seeding, loading into :class:`~trioproxy.pricing.ModelPrice`, upserting.

Prices are ``Numeric(20, 10)`` columns; tiers are a JSON list whose decimals are strings (JSON numbers would
pass through floats). Editing a price is a configuration write: it bumps the config version, so the proxy
prices the next request with it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from trioproxy.errors import ConfigError
from trioproxy.pricing import SEED_PRICES, ModelPrice, PriceTier
from trioproxy.snapshot import ProviderKind
from trioproxy.store.db import bump_config_version, write_session
from trioproxy.store.models import ModelPriceRow, utcnow

_PRICES = cast(sa.Table, ModelPriceRow.__table__)


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _undec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def tiers_to_json(tiers: tuple[PriceTier, ...]) -> list[dict[str, Any]]:
    return [
        {
            "min_input_tokens": tier.min_input_tokens,
            "input_per_million": _dec(tier.input_per_million),
            "output_per_million": _dec(tier.output_per_million),
            "cache_read_per_million": _dec(tier.cache_read_per_million),
            "cache_write_per_million": _dec(tier.cache_write_per_million),
        }
        for tier in tiers
    ]


def tiers_from_json(raw: list[dict[str, Any]]) -> tuple[PriceTier, ...]:
    try:
        return tuple(
            PriceTier(
                min_input_tokens=int(item["min_input_tokens"]),
                input_per_million=Decimal(str(item["input_per_million"])),
                output_per_million=Decimal(str(item["output_per_million"])),
                cache_read_per_million=_undec(item.get("cache_read_per_million")),
                cache_write_per_million=_undec(item.get("cache_write_per_million")),
            )
            for item in raw
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError("a stored price tier is malformed") from exc


def _row_values(price: ModelPrice) -> dict[str, Any]:
    return {
        "provider_kind": price.provider_kind.value,
        "model": price.model,
        "input_per_million": price.input_per_million,
        "output_per_million": price.output_per_million,
        "cache_read_per_million": price.cache_read_per_million,
        "cache_write_per_million": price.cache_write_per_million,
        "tiers": tiers_to_json(price.tiers),
        "updated_at": utcnow(),
    }


def load_prices(conn: Connection | Session) -> list[ModelPrice]:
    """Every stored price, in a stable order, read inside the caller's transaction."""
    rows = conn.execute(sa.select(_PRICES).order_by(_PRICES.c.provider_kind, _PRICES.c.model)).mappings()
    prices = []
    for row in rows:
        try:
            kind = ProviderKind(row["provider_kind"])
        except ValueError as exc:
            raise ConfigError(f"model price {row['id']} has an unknown provider kind") from exc
        prices.append(
            ModelPrice(
                model=row["model"],
                provider_kind=kind,
                input_per_million=Decimal(str(row["input_per_million"])),
                output_per_million=Decimal(str(row["output_per_million"])),
                cache_read_per_million=_undec(row["cache_read_per_million"]),
                cache_write_per_million=_undec(row["cache_write_per_million"]),
                tiers=tiers_from_json(row["tiers"] or []),
            )
        )
    return prices


def seed_prices_if_empty(engine: Engine) -> int:
    """Fill an empty price table from :data:`~trioproxy.pricing.SEED_PRICES`; returns the number of rows
    added.

    A table with any row is left alone, so an operator's edits and deletions survive restarts.
    """
    with write_session(engine) as session:
        if session.execute(sa.select(_PRICES.c.id).limit(1)).first() is not None:
            return 0
        session.execute(sa.insert(_PRICES), [_row_values(price) for price in SEED_PRICES])
        bump_config_version(session)
        return len(SEED_PRICES)


def upsert_price(engine: Engine, price: ModelPrice) -> None:
    """Insert or replace the price of (``price.provider_kind``, ``price.model``) and bump the config
    version."""
    values = _row_values(price)
    with write_session(engine) as session:
        updated: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
            sa.update(_PRICES)
            .where(_PRICES.c.provider_kind == values["provider_kind"], _PRICES.c.model == values["model"])
            .values(**values)
        )
        if updated.rowcount == 0:
            session.execute(sa.insert(_PRICES).values(**values))
        bump_config_version(session)
